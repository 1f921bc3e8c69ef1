"""Finding the `chroma` command for the local server, without starting one."""

import os
import sys
from pathlib import Path

import pytest

from memory_store.errors import MemoryStoreError
from memory_store.server import _beside_interpreter, chroma_executable

CHROMA = "chroma.exe" if os.name == "nt" else "chroma"


def _script(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
    """A sys.executable in an unactivated venv's bin/, and a PATH that holds nothing."""
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    monkeypatch.setattr(sys, "executable", str(python))
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    return python


def test_finds_chroma_beside_the_interpreter_when_path_lacks_it(fake_python):
    beside = _script(fake_python.parent / CHROMA)
    assert chroma_executable() == str(beside)


def test_beside_the_interpreter_wins_over_path(fake_python, tmp_path, monkeypatch):
    beside = _script(fake_python.parent / CHROMA)
    other = _script(tmp_path / "elsewhere" / CHROMA)
    monkeypatch.setenv("PATH", str(other.parent))
    assert chroma_executable() == str(beside)


def test_falls_back_to_path(fake_python, tmp_path, monkeypatch):
    on_path = _script(tmp_path / "elsewhere" / CHROMA)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert Path(chroma_executable()) == on_path


def test_error_names_both_places_looked(fake_python):
    with pytest.raises(MemoryStoreError) as err:
        chroma_executable()
    message = str(err.value)
    assert str(fake_python.parent / CHROMA) in message
    assert "PATH" in message


def test_windows_looks_in_the_interpreter_folder_and_its_scripts(tmp_path):
    assert _beside_interpreter(tmp_path, windows=True) == [tmp_path / "chroma.exe", tmp_path / "Scripts" / "chroma.exe"]
    assert _beside_interpreter(tmp_path, windows=False) == [tmp_path / "chroma"]
