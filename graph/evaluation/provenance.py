"""Which code produced an evaluation's numbers: the git commit of this checkout, else the package version.

An evaluation can run for hours and resume in another process; if the code changed in
between, its arms were not made by one program, and the report must say so (the numerics
of reduced-precision decoding and the loop's own rules both change with the code).
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
_CODE = ("*.py", "pyproject.toml")  # what runs; a commit that changes only documents is the same program


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(_ROOT), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


@functools.cache
def code_version() -> str:
    """'git <commit>': the last commit that changed code (with '+changes' when code files differ from it);
    outside a git checkout 'selfimprove <version>'."""
    try:
        commit = _git("log", "-1", "--format=%h", "--abbrev=12", "--", *_CODE)
        if commit:
            changed = _git("status", "--porcelain", "--untracked-files=no", "--", *_CODE)
            return f"git {commit}{'+changes' if changed else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"selfimprove {metadata.version('selfimprove')}"
    except metadata.PackageNotFoundError:
        return "unknown"
