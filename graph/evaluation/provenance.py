"""Which code, on which machine, produced an evaluation's numbers.

An evaluation can run for hours and resume in another process; if the code changed in
between, its arms were not made by one program, and the report must say so (the numerics
of reduced-precision decoding and the loop's own rules both change with the code). The
machine matters the same way: each CPU kind blocks and rounds its matrix products its own
way (bfloat16 is emulated where the CPU lacks it), so an arm made on another machine flips
answers by that alone, and arms are compared answer by answer.
"""

from __future__ import annotations

import functools
import re
import subprocess
from importlib import metadata
from pathlib import Path

from agents.lm.precision import device_name

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


# CPU features that change how torch's kernels compute (vector width, bfloat16, int8 and AMX units).
NUMERIC_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                    "amx_bf16", "amx_int8", "amx_tile")


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str] | None:
    """The ``NUMERIC_FEATURES`` this CPU has, in that order; None where /proc/cpuinfo has no x86 flags line."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else [f for f in NUMERIC_FEATURES if f in flags]


def machine(device_type: str) -> dict:
    """The machine an arm runs on: the device with its model's name, the CPU features (None: not known,
    or not a CPU), torch's version."""
    import torch

    device = device_name(device_type)
    return {"device": device, "features": cpu_features() if device_type == "cpu" else None, "torch": torch.__version__}


def machine_label(m: dict) -> str:
    """One line for messages and reports: 'cpu (AMD EPYC) [avx2 fma], torch 2.13.0'."""
    features = m.get("features")
    shown = f" [{' '.join(features) if features else 'no AVX2 or later'}]" if features is not None else ""
    return f"{m['device']}{shown}" + (f", torch {m['torch']}" if m.get("torch") else "")


def same_machine(a: dict, b: dict) -> bool:
    """Whether two machine records name the same kind of machine; a part one of them lacks (a record
    read back from an older arm's backend line has the device only) is not compared."""
    return all(a[key] == b[key] for key in ("device", "features", "torch")
               if a.get(key) is not None and b.get(key) is not None)


_BACKEND_DEVICE = re.compile(r" on ((?:cpu|cuda)\S* \(.*\))(?:, \d+ threads)?$")
_BACKEND_TORCH = re.compile(r"^torch (\S+) ")


def machine_from_backend(backend: str) -> dict | None:
    """The device (and, for torch, its version) that an arm's backend line names
    (``torch 2.13.0+cpu (...), ... weights on cpu (NAME), 2 threads``), for arms saved before
    machines were recorded; None when the line names no device."""
    found = _BACKEND_DEVICE.search(backend or "")
    if found is None:
        return None
    torch_version = _BACKEND_TORCH.match(backend)
    return {"device": found.group(1), "features": None, "torch": torch_version.group(1) if torch_version else None}
