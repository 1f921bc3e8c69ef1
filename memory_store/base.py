"""StoreBase: an open store's state and the discipline every MemoryStore method follows.

It holds the Chroma client and its two collections (checked on construction), the locks, the
memory graph and its file, and the one way to write: under the store's thread lock and, for an
embedded writer, the exclusive io lock, with the dirty marker on disk before the first Chroma
write and the graph saved every ``graph_autosave_s``, on flush and at close. Also the paged
reads the graph is rebuilt from, and the embedding check every query and write shares.

``MemoryStore`` (store.py) inherits it and adds the reading and writing API; the locking and
graph-syncing code, where the thread-safety and crash guarantees live, reads on its own here.
``opening`` builds a store: it calls the constructor with what it opened.
"""

from __future__ import annotations

import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Self

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction

from memory_store.chroma import chroma_errors
from memory_store.config import MemoryConfig
from memory_store.errors import MemoryStoreError, ReadOnlyError
from memory_store.graph import MemoryGraph
from memory_store.graph_file import GraphFile
from memory_store.locks import IoLock, WriterLock
from memory_store.opening import open_collection
from memory_store.records import Episode, Rule

PAGE = 5000  # rows per Chroma get() page when reading whole collections


def _as_matrix(embeddings: Any, n: int, dim: int) -> np.ndarray:
    matrix = np.asarray(embeddings, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]  # (1, dim)
    if matrix.shape != (n, dim):
        raise MemoryStoreError(f"embeddings must have shape ({n}, {dim}), got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise MemoryStoreError("embeddings contain NaN or infinite values")
    return matrix  # (n, dim)


class StoreBase:
    """Built by ``opening.open_store`` through ``MemoryStore.open``; close it (or use ``with``)."""

    def __init__(
        self,
        config: MemoryConfig,
        embedder: EmbeddingFunction[Documents],
        client: Any,
        writable: bool,
        writer_lock: WriterLock | None,
        io_lock: IoLock | None,
        files_dir: Path,
        snapshot_dir: Path | None,
    ) -> None:
        self.config = config
        self.embedder = embedder
        self.writable = writable
        self._client = client
        self._writer_lock = writer_lock
        self._io_lock = io_lock
        self._snapshot_dir = snapshot_dir
        self._lock = threading.RLock()
        self._graph_file = GraphFile(files_dir, io_lock)  # files_dir: where graph JSON and dirty marker live
        self._closed = False
        if snapshot_dir is not None:
            self._cleanup = weakref.finalize(self, shutil.rmtree, snapshot_dir, True)
        self._rules = open_collection(client, config.rules_collection, config, embedder, writable)
        self._episodes = open_collection(client, config.episodes_collection, config, embedder, writable)
        self.graph = self._load_graph()

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """Save the graph (if writable), release Chroma and the writer lock. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self.writable and (self._graph_file.dirty or not self._graph_file.exists()):
                    self._save_graph()
            finally:
                self._client.close()
                if self._writer_lock is not None:
                    self._writer_lock.release()
                if self._snapshot_dir is not None:
                    self._cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mode(self) -> str:
        return "embedded" if self.config.embedded else "server"

    # -- the graph file -------------------------------------------------------------------

    def _load_graph(self) -> MemoryGraph:
        with chroma_errors("count"):
            have = (self._rules.count(), self._episodes.count())
        graph = self._graph_file.load(have)
        if graph is not None:
            return graph
        graph = MemoryGraph.from_records(self._iter_rules(), self._iter_episodes())
        if self.writable:
            self.graph = graph
            self._save_graph()
        return graph

    def rebuild_graph(self) -> MemoryGraph:
        """Rebuild the graph from Chroma metadata (e.g. to see other loops' writes on a server)."""
        with self._lock:
            self.graph = MemoryGraph.from_records(self._iter_rules(), self._iter_episodes())
            if self.writable:
                self._save_graph()
            return self.graph

    def _save_graph(self) -> None:
        self._graph_file.save(self.graph)

    def flush(self) -> None:
        """Save the graph now (writes also save it every graph_autosave_s and at close)."""
        self._require_writable("flush")
        with self._lock:
            self._save_graph()

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """Serialise a write: thread lock, io lock, dirty marker first, autosave after."""
        self._require_writable(what)
        with self._lock:
            io = self._io_lock.exclusive() if self._io_lock is not None else nullcontext()
            with io:
                if not self._graph_file.dirty:
                    self._graph_file.mark_dirty()
                with chroma_errors(what):
                    yield
            if time.monotonic() - self._graph_file.last_save >= self.config.graph_autosave_s:
                self._save_graph()

    def _require_writable(self, what: str) -> None:
        if self._closed:
            raise MemoryStoreError(f"cannot {what}: the memory store is closed")
        if not self.writable:
            raise ReadOnlyError(f"cannot {what}: the memory store was opened read-only")

    def _require_open(self) -> None:
        if self._closed:
            raise MemoryStoreError("the memory store is closed")

    # -- embedding ------------------------------------------------------------------------

    def _embed(self, texts: list[str], embeddings: Any | None) -> np.ndarray:
        if embeddings is None:
            embeddings = self.embedder(texts)
        return _as_matrix(embeddings, len(texts), self.config.embed_dim)  # (n, embed_dim)

    # -- reading rows ---------------------------------------------------------------------

    def _iter_rows(self, collection: Any, where: dict[str, Any] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        offset = 0
        while True:
            with chroma_errors("get"):
                page = collection.get(where=where, limit=PAGE, offset=offset, include=["documents", "metadatas"])
            yield from zip(page["documents"], page["metadatas"], strict=True)
            if len(page["ids"]) < PAGE:
                return
            offset += PAGE

    def _iter_rules(self, where: dict[str, Any] | None = None) -> Iterator[Rule]:
        for document, meta in self._iter_rows(self._rules, where):
            yield Rule.from_chroma(document, meta)

    def _iter_episodes(self, where: dict[str, Any] | None = None) -> Iterator[Episode]:
        for document, meta in self._iter_rows(self._episodes, where):
            yield Episode.from_chroma(document, meta)
