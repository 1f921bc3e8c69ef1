"""Which floating-point precision the model's frozen weights run in, per device.

``auto`` is bfloat16 on CUDA (where it is supported), and on CPU whatever a short
calibration measures faster here: the product of a model-shaped weight with 64 rows, in
float32 and in bfloat16. bfloat16 is chosen only when it is at least ``BFLOAT16_MIN_SPEEDUP``
times faster (CPUs with AMX are several times faster; without AMX or AVX512-BF16 bfloat16
is emulated and slower). That it holds accuracy is what bench/bench_precision.py measures
(GSM8K answers scored in each precision, McNemar against float32; figures in the README).
The calibration result is cached per CPU, torch version and thread count, so it runs once.

Adapters and the router keep float32 weights whatever the base precision
(adapters/bank.py): tiny updates would vanish in bfloat16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from agents.files import atomic_write_text, cache_root

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "float32", "bfloat16")
BFLOAT16_MIN_SPEEDUP = 1.5  # below this, float32's exactness is worth more than the time
CALIBRATION_SHAPE = (64, 896, 4864)  # rows, in, out: Qwen2.5-0.5B's MLP up-projection at 64 decode slots
CALIBRATION_FORMAT = 2  # 2: the dtypes timed in alternation (1 timed them one after the other)


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # 'auto', 'float32' or 'bfloat16'
    used: str  # 'float32' or 'bfloat16'
    reason: str  # why, for the run's output and reports

    def to_dict(self) -> dict:
        return asdict(self)


def choose_precision(requested: str, device_type: str, cache_dir: Path | None = None) -> PrecisionChoice:
    """The precision to load the model in: the requested one, or for 'auto' the device's fastest."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, requested, "as requested")
    if device_type == "cuda":
        import torch

        if torch.cuda.is_bf16_supported():
            return PrecisionChoice("auto", "bfloat16", "CUDA with bfloat16 support")
        return PrecisionChoice("auto", "float32", "CUDA without bfloat16 support")
    if device_type != "cpu":
        return PrecisionChoice("auto", "float32", f"no calibration for device {device_type!r}")
    result = cpu_calibration(cache_dir)
    speedup = result["bfloat16_gflops"] / result["float32_gflops"]
    used = "bfloat16" if speedup >= BFLOAT16_MIN_SPEEDUP else "float32"
    return PrecisionChoice("auto", used, f"calibrated on this CPU: bfloat16 matrix products {speedup:.1f}x float32 "
                                         f"({result['bfloat16_gflops']:.0f} vs {result['float32_gflops']:.0f} GFLOP/s)")


def cpu_calibration(cache_dir: Path | None = None) -> dict:
    """float32 and bfloat16 GFLOP/s of one model-shaped product on this CPU; measured once, then read from cache."""
    import torch

    key = hashlib.sha256(json.dumps([CALIBRATION_FORMAT, cpu_name(), torch.__version__, torch.get_num_threads(),
                                     CALIBRATION_SHAPE]).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"precision-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    measured = measure_gflops((torch.float32, torch.bfloat16), *CALIBRATION_SHAPE)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "shape": list(CALIBRATION_SHAPE), **{f"{name}_gflops": gflops for name, gflops in measured.items()}}
    try:
        atomic_write_text(path, json.dumps(result))
    except OSError as err:  # an unwritable cache costs a re-measure next time, nothing else
        log.warning("cannot cache the precision calibration in %s: %s", path, err)
    log.info("precision calibration: %s", result)
    return result


def measure_gflops(dtypes: Sequence["torch.dtype"], rows: int, n_in: int, n_out: int,
                   seconds: float = 0.5) -> dict[str, float]:
    """GFLOP/s of ``linear((rows, n_in), (n_out, n_in))`` per dtype, keyed 'float32', 'bfloat16'...:
    the best of repeated timings within ``seconds``, a budget the dtypes share.

    The dtypes are timed in alternation, one product each in turn, so that a load they share
    (another job on the cores, a clock still ramping up) slows them alike: their ratio, which
    ``choose_precision`` decides by, holds even when the absolute figures do not.
    """
    import torch

    if len(set(dtypes)) != len(dtypes) or not dtypes:
        raise ValueError(f"dtypes must be distinct and at least one, got {list(dtypes)}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=generator)
    weight = torch.randn(n_out, n_in, generator=generator)
    operands = {str(d).removeprefix("torch."): (x.to(d), weight.to(d)) for d in dtypes}
    for a, w in operands.values():
        torch.nn.functional.linear(a, w)  # warm-up: kernel selection, packing
    best = dict.fromkeys(operands, float("inf"))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, (a, w) in operands.items():
            start = time.perf_counter()
            torch.nn.functional.linear(a, w)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 2 * rows * n_in * n_out / t / 1e9 for name, t in best.items()}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """A device as run logs and reports name it: the CPU's or GPU's model beside torch's name."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({cpu_name()})" if device.type == "cpu" else str(device)


def load_in_precision(spec: str, precision: str = "auto"):
    """``load_model(spec)`` in the precision ``precision`` resolves to on this device; (LoadedModel, PrecisionChoice)."""
    from agents.lm.models import load_model, pick_device

    choice = choose_precision(precision, pick_device(None).type)
    return load_model(spec, dtype=choice.used), choice
