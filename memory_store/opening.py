"""The three ways a MemoryStore is opened, and the check of its collections on opening.

- Server (``MemoryConfig.url`` set): ``chromadb.HttpClient`` at the URL, no file locks; the
  graph JSON still lives in run_dir/memory/, made when writable.
- Embedded, writable: the writer lock on run_dir/memory/writer.lock first (WriterLockedError
  if another process holds it), then ``chromadb.PersistentClient`` on run_dir/memory/chroma;
  the io lock is handed on for the store to take around each write.
- Embedded, read-only: copies chroma/ and the graph files under the shared io lock into a
  temporary folder and reads the copy, so inspecting a running loop never touches the
  writer's files; later writes are not seen.

Each way ends by calling ``build`` (the store's constructor, given the client, the locks and
the folders) inside its own cleanup: if an embedded store fails to build, its client is
closed, its writer lock released and its snapshot removed. Kept apart from the store so its
reading and writing code does not carry the three set-ups and their failure paths.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import chromadb
import httpx
from chromadb.api.types import Documents, EmbeddingFunction
from chromadb.config import Settings
from chromadb.errors import ChromaError, NotFoundError

from memory_store.config import MemoryConfig
from memory_store.errors import MemoryStoreError
from memory_store.graph_file import DIRTY_FILE, GRAPH_FILE
from memory_store.locks import IoLock, WriterLock

CHROMA_DIR = "chroma"
WRITER_LOCK_FILE = "writer.lock"
IO_LOCK_FILE = "io.lock"
STORE_SCHEMA = 1  # bump when the metadata layout changes

T = TypeVar("T")


def open_store(config: MemoryConfig, writable: bool, build: Callable[..., T]) -> T:
    """Open the way ``config`` and ``writable`` say, then ``build(client=..., writable=..., writer_lock=...,
    io_lock=..., files_dir=..., snapshot_dir=...)`` and return what it returns."""
    settings = Settings(anonymized_telemetry=False)
    if config.url is not None:
        return _open_server(config, writable, settings, build)
    io_lock = IoLock(config.memory_dir / IO_LOCK_FILE)
    if writable:
        return _open_writer(config, io_lock, settings, build)
    return _open_snapshot(config, io_lock, settings, build)


def _open_server(config: MemoryConfig, writable: bool, settings: Settings, build: Callable[..., T]) -> T:
    memory_dir = config.memory_dir
    parts = urlsplit(config.url)
    ssl = parts.scheme == "https"
    port = parts.port or (443 if ssl else 8000)
    try:
        client = chromadb.HttpClient(host=parts.hostname, port=port, ssl=ssl, settings=settings)
    except (ValueError, ChromaError, httpx.HTTPError) as exc:
        raise MemoryStoreError(f"cannot reach the Chroma server at {config.url}: {exc}") from None
    if writable:
        memory_dir.mkdir(parents=True, exist_ok=True)
    return build(
        client=client, writable=writable, writer_lock=None, io_lock=None, files_dir=memory_dir, snapshot_dir=None
    )


def _open_writer(config: MemoryConfig, io_lock: IoLock, settings: Settings, build: Callable[..., T]) -> T:
    memory_dir = config.memory_dir
    writer_lock = WriterLock(memory_dir / WRITER_LOCK_FILE)
    writer_lock.acquire()
    client = None
    try:
        client = chromadb.PersistentClient(path=str(memory_dir / CHROMA_DIR), settings=settings)
        return build(
            client=client,
            writable=True,
            writer_lock=writer_lock,
            io_lock=io_lock,
            files_dir=memory_dir,
            snapshot_dir=None,
        )
    except BaseException:
        if client is not None:
            client.close()
        writer_lock.release()
        raise


def _open_snapshot(config: MemoryConfig, io_lock: IoLock, settings: Settings, build: Callable[..., T]) -> T:
    memory_dir = config.memory_dir
    if not (memory_dir / CHROMA_DIR).is_dir():
        raise MemoryStoreError(f"no memory store in {memory_dir} (nothing has been written there yet)")
    snapshot = Path(tempfile.mkdtemp(prefix="memory-snapshot-"))
    client = None
    try:
        with io_lock.shared(config.lock_timeout_s):
            shutil.copytree(memory_dir / CHROMA_DIR, snapshot / CHROMA_DIR)
            for name in (GRAPH_FILE, DIRTY_FILE):
                if (memory_dir / name).exists():
                    shutil.copy2(memory_dir / name, snapshot / name)
        client = chromadb.PersistentClient(path=str(snapshot / CHROMA_DIR), settings=settings)
        return build(
            client=client, writable=False, writer_lock=None, io_lock=None, files_dir=snapshot, snapshot_dir=snapshot
        )
    except BaseException:
        if client is not None:
            client.close()
        shutil.rmtree(snapshot, ignore_errors=True)
        raise


def open_collection(
    client: Any, name: str, config: MemoryConfig, embedder: EmbeddingFunction[Documents], writable: bool
) -> Any:
    """The collection ``name``, created if writable; MemoryStoreError if missing or built otherwise."""
    expected = {"embed_dim": config.embed_dim, "schema": STORE_SCHEMA}
    try:
        if writable:
            collection = client.get_or_create_collection(
                name,
                configuration={"hnsw": {"space": "cosine"}},
                metadata=expected,
                embedding_function=embedder,
            )
        else:
            collection = client.get_collection(name, embedding_function=embedder)
    except NotFoundError:
        raise MemoryStoreError(
            f"memory store has no collection {name!r}; open it writable once to create it"
        ) from None
    except ValueError as exc:  # Chroma's message for a different persisted embedding function
        if "conflict" not in str(exc):
            raise
        raise MemoryStoreError(f"collection {name!r} was built with another embedder: {exc}") from None
    except (ChromaError, httpx.TransportError) as exc:
        raise MemoryStoreError(f"cannot open collection {name!r}: {exc}") from exc
    found = {key: (collection.metadata or {}).get(key) for key in expected}
    if found != expected:
        raise MemoryStoreError(f"collection {name!r} has {found}, this code expects {expected}")
    return collection
