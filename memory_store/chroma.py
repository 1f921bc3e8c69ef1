"""What every module that reads Chroma's answers shares: similarities and one-line errors.

Chroma reports cosine distance (the collections are made with ``hnsw.space = "cosine"``);
the store, the dedup decision and the router features all think in similarity, so the
conversion lives here once. Chroma's and the HTTP client's failures become MemoryStoreError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx
from chromadb.errors import ChromaError

from memory_store.errors import MemoryStoreError


def similarity(distance: float) -> float:
    """Chroma's cosine distance is 1 - cos; clip to [0, 1] so weights stay non-negative."""
    return float(min(1.0, max(0.0, 1.0 - distance)))


@contextmanager
def chroma_errors(what: str) -> Iterator[None]:
    """Turn Chroma's and the HTTP client's failures into one-line MemoryStoreErrors."""
    try:
        yield
    except ChromaError as exc:
        raise MemoryStoreError(f"chroma {what} failed: {exc}") from exc
    except httpx.TransportError as exc:
        raise MemoryStoreError(f"chroma server unreachable during {what}: {exc}") from exc
