"""The memory graph's file beside Chroma: when the saved JSON can be trusted, saving, the dirty marker.

Files, in run_dir/memory/ (or a read-only store's snapshot folder):
    memory_graph.json  node-link JSON of the MemoryGraph, replaced atomically
    graph.dirty        present while the JSON may lag Chroma (a crash leaves it: rebuild)

Chroma is the truth and the JSON a cache of it. The store marks the file dirty before its
first write after a save, and saves every ``graph_autosave_s`` during writes, on flush and at
close. The store calls all of this under its own thread lock.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from pathlib import Path

from agents.files import fsync_dir
from memory_store.errors import MemoryStoreError
from memory_store.graph import MemoryGraph
from memory_store.locks import IoLock

logger = logging.getLogger(__name__)

GRAPH_FILE = "memory_graph.json"
DIRTY_FILE = "graph.dirty"


class GraphFile:
    def __init__(self, folder: Path, io_lock: IoLock | None) -> None:
        self.folder = folder  # where the graph JSON and dirty marker are read (and written)
        self._io_lock = io_lock  # taken exclusively around each save (embedded writer only)
        self.dirty = False  # True from the marker on disk until the next save
        self.last_save = time.monotonic()

    def exists(self) -> bool:
        return (self.folder / GRAPH_FILE).exists()

    def load(self, have: tuple[int, int]) -> MemoryGraph | None:
        """The saved graph if it is clean and holds ``have`` (rules, episodes); else None, logged when it matters."""
        path = self.folder / GRAPH_FILE
        reason = None
        if (self.folder / DIRTY_FILE).exists():
            reason = "the last writer did not close cleanly"
        else:
            try:
                graph = MemoryGraph.load(path)
            except MemoryStoreError as exc:
                reason = str(exc)
            else:
                counts = graph.nx_graph.nodes(data=True)
                n_rules = sum(1 for _, d in counts if d.get("kind") == "rule" and "status" in d)
                n_episodes = sum(1 for _, d in counts if d.get("kind") == "episode" and "split" in d)
                if (n_rules, n_episodes) == have:
                    return graph
                reason = f"it holds {n_rules} rules and {n_episodes} episodes, Chroma {have[0]} and {have[1]}"
        if any(have):
            logger.warning("rebuilding the memory graph from Chroma metadata: %s", reason)
        return None

    def save(self, graph: MemoryGraph) -> None:
        with self._io_lock.exclusive() if self._io_lock is not None else nullcontext():
            graph.save(self.folder / GRAPH_FILE)
            (self.folder / DIRTY_FILE).unlink(missing_ok=True)
        self.dirty = False
        self.last_save = time.monotonic()

    def mark_dirty(self) -> None:
        """Put the marker on disk before the Chroma write: a crash after it means "rebuild"."""
        fd = os.open(self.folder / DIRTY_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(self.folder)
        self.dirty = True
