"""A run folder as inspection reads it: its saved settings, and a one-line error when it is not one.

A run directory is one loop's folder (``run_loop.py run --run-dir``) or one arm of an
evaluation (``<eval dir>/arms/<arm>``).
"""

from __future__ import annotations

import json
from pathlib import Path

from agents.errors import SelfImproveError


class RunDirNotFound(SelfImproveError):
    """The directory is not a run directory (or holds no memory yet)."""


def read_run_settings(run_dir: Path) -> dict:
    """The run's saved settings (run.json), or {} when it has none."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunDirNotFound(f"{path} is unreadable: {err}") from err


def check_run_folder(run_dir: Path, needs: str) -> None:
    if not run_dir.is_dir():
        raise RunDirNotFound(f"run directory {run_dir} does not exist")
    if not (run_dir / needs).exists():
        if (run_dir / "arms").is_dir():
            arms = sorted(p.name for p in (run_dir / "arms").iterdir() if (p / needs).exists())
            raise RunDirNotFound(f"{run_dir} is an evaluation; pass one arm's folder, e.g. --run-dir {run_dir / 'arms' / (arms[0] if arms else 'full')}")
        raise RunDirNotFound(f"{run_dir} holds no {needs} (not a run directory, or nothing written yet)")
