"""File helpers every package uses: atomic writes, the cache folder, a cheap file identity.

No project imports: this module sits at the bottom of the layering, beside ``agents.errors``.

An atomic write goes to a temp file in the destination's folder, is fsynced, renamed over the
destination and the folder is fsynced, so that after a crash at any moment a reader finds
the old file or the new one, whole, and the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

CACHE_ENV = "SELFIMPROVE_CACHE"
FILE_MODE = 0o644  # mkstemp makes 0600; run folders and caches may be read by other users


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache folder: cache_dir, else $SELFIMPROVE_CACHE, else ~/.cache/selfimprove."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "selfimprove"


def file_fingerprint(path: Path) -> str:
    """Path, size and mtime: hashing the content would cost seconds on every load of a large file."""
    stat = path.stat()
    identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write into; on a clean exit it replaces ``path``, else it is removed.

    For writers that open the file themselves (a GGUF writer, a chunked copy). The temp file
    is fsynced before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name tells a leftover of a killed write: ".<name>.tmp-<random>" beside <name>.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # gone already after a successful replace
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path so that readers see the old file or the new one, never a part."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def fsync_dir(directory: Path) -> None:
    """Make the latest rename or creation in ``directory`` durable."""
    _fsync(directory)


def _fsync(path: Path) -> None:
    """fsync a file's data, or a folder's entries."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
