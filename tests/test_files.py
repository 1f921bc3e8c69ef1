"""The shared file helpers: atomic writes leave the old file or the new one, and no temp file."""

import stat

import pytest

from agents.files import atomic_path, atomic_write_bytes, cache_root, file_fingerprint


def test_an_atomic_write_replaces_the_file_readably(tmp_path):
    path = tmp_path / "deep" / "f.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["f.json"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"whole")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"par")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"whole"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_cache_root_and_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFIMPROVE_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    f = tmp_path / "w.bin"
    f.write_bytes(b"1")
    first = file_fingerprint(f)
    f.write_bytes(b"22")
    assert file_fingerprint(f) != first  # size and mtime are part of it
