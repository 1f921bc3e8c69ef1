"""How OpenMP threads wait at barriers, set before torch loads by every command and benchmark that generates.

Torch and llama.cpp share one OpenMP runtime, whose threads busy-wait at every barrier by
default; spinning briefly, then sleeping, was measured best alone and with two busy processes
(bench/bench_generation.py; figures in the README). The runtime reads its settings once, when
torch loads, so this module imports nothing that imports torch.
"""

from __future__ import annotations

import os


def bounded_openmp_wait() -> None:
    """GOMP_SPINCOUNT=10000 unless the user set OMP_WAIT_POLICY or GOMP_SPINCOUNT (child processes inherit it)."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "10000")
