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


@functools.cache
def code_version() -> str:
    """'git <commit>' (with '+changes' when tracked files differ from it), or 'selfimprove <version>'."""
    try:
        commit = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"git {commit}{'+changes' if changed else ''}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"selfimprove {metadata.version('selfimprove')}"
    except metadata.PackageNotFoundError:
        return "unknown"
