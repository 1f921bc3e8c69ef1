"""File locks that keep one writer per embedded store and give readers a consistent view.

Chroma's embedded client is thread-safe but not process-safe, so:
- ``WriterLock``: an exclusive ``fcntl.flock`` on ``writer.lock`` held while a store is open
  for writing. The kernel drops it when the holder dies, so a crash leaves no stale lock; the
  file keeps the holder's pid for the error message.
- ``IoLock``: the writer takes ``io.lock`` exclusively around each write; a reader takes it
  shared while it copies a snapshot, so it never copies a half-written index.
POSIX only (fcntl), like the rest of the project's run-directory handling.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from memory_store.errors import MemoryStoreError, WriterLockedError


class WriterLock:
    def __init__(self, path: Path, what: str | None = None) -> None:
        self.path = Path(path)
        self.what = what  # what the lock guards, for the error message (default: the memory store)
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if self.what is not None:
                raise WriterLockedError(f"{self.what} is in use by process {holder}; wait for it or stop it") from None
            raise WriterLockedError(
                f"memory store {self.path.parent} is already open for writing by process {holder}; "
                "stop it, or open the store read-only (writable=False)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        # Leave the file in place: deleting it would let a newcomer lock a different inode.
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class IoLock:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # readers hold it only while copying: a short wait
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    @contextmanager
    def shared(self, timeout_s: float) -> Iterator[None]:
        fd = self._open()
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise MemoryStoreError(
                            f"memory store {self.path.parent} stayed busy for {timeout_s:g} s; try again"
                        ) from None
                    time.sleep(0.01)
            yield
        finally:
            os.close(fd)
