"""Which floating-point precision the model's frozen weights run in, per device.

``int8`` runs on the CPU only: the weights stay float32 (training runs through them) and
the torch backend decodes through 8-bit copies of the linear layers
(agents/lm/cpu_kernels.Int8Linears).

``auto`` is bfloat16 on CUDA (where it is supported), and on CPU whatever a short
calibration measures faster here: the product of a model-shaped weight with 64 rows, in
float32, bfloat16 and int8. bfloat16 is chosen when it is at least ``MIN_SPEEDUP`` times
faster than float32 (CPUs with AMX or AVX512-BF16 are several times faster; elsewhere
bfloat16 is emulated and slower), else int8 when it is (fbgemm's int8 kernels are 2-3x
float32 on an AVX2-only CPU), else float32. That each holds accuracy is what
bench/bench_precision.py measures (GSM8K answers scored in each precision, McNemar against
float32; figures in the README). The calibration result is cached per CPU, torch version
and thread count, so it runs once.

Adapters and the router keep float32 weights whatever the base precision
(adapters/bank.py): tiny updates would vanish in bfloat16.
"""

from __future__ import annotations

import functools
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

PRECISIONS = ("auto", "float32", "bfloat16", "int8")
MIN_SPEEDUP = 1.5  # below this, float32's exactness is worth more than the time
CALIBRATION_SHAPE = (64, 896, 4864)  # rows, in, out: Qwen2.5-0.5B's MLP up-projection at 64 decode slots
CALIBRATION_FORMAT = 3  # 3: int8 timed too; 2: the dtypes timed in alternation (1: one after the other)


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str  # one of PRECISIONS
    used: str  # 'float32', 'bfloat16' or 'int8'
    reason: str  # why, for the run's output and reports

    def to_dict(self) -> dict:
        return asdict(self)


REDUCED = ("bfloat16", "int8")  # what ``auto`` may pick over float32, in order of preference


def choose_precision(requested: str, device_type: str, cache_dir: Path | None = None,
                     reduced: Sequence[str] = REDUCED) -> PrecisionChoice:
    """The precision to load the model in: the requested one, or for 'auto' the device's fastest of
    float32 and ``reduced`` (a run on llama.cpp, which decodes its own weights, leaves int8 out)."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    if requested == "int8":
        check_int8(device_type)
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
    float32 = result["float32_gflops"]
    speedups = {kind: result[f"{kind}_gflops"] / float32 for kind in REDUCED
                if kind in reduced and f"{kind}_gflops" in result}
    used = next((kind for kind, speedup in speedups.items() if speedup >= MIN_SPEEDUP), "float32")
    measured = ", ".join(f"{kind} {speedup:.1f}x" for kind, speedup in speedups.items())
    figures = ", ".join(f"{kind} {result[f'{kind}_gflops']:.0f}" for kind in ("float32", *speedups))
    return PrecisionChoice("auto", used, f"calibrated on this CPU: matrix products in {measured} float32 "
                                         f"({figures} GFLOP/s)")


def reduced_for(backend: str, saved_auto: bool = False) -> tuple[str, ...]:
    """What ``auto`` may pick for a run on ``backend``: llama.cpp decodes its own weights, so int8
    (a torch-backend precision) is left out there; so it is for a run saved as 'auto' before int8
    existed (``saved_auto``), which resumes in what it ran in."""
    return ("bfloat16",) if backend == "llama.cpp" or saved_auto else REDUCED


def check_precision_for_backend(precision: str, backend: str) -> None:
    """Raise ValueError, in one line, for a precision the backend cannot decode in."""
    if precision == "int8" and backend == "llama.cpp":
        raise ValueError("precision int8 decodes on the torch backend; llama.cpp serves its own GGUF weights "
                         "(use --precision float32 or auto with --backend llama.cpp)")


def check_int8(device_type: str) -> None:
    """Raise ValueError, in one line, where the int8 precision cannot run."""
    if device_type != "cpu":
        raise ValueError(f"precision int8 runs on the CPU only; this run's device is {device_type}")
    from agents.lm.cpu_kernels import int8_linear_available

    if not int8_linear_available():
        raise ValueError("precision int8 needs torch's fbgemm int8 kernels, which this torch build lacks")


def cpu_calibration(cache_dir: Path | None = None) -> dict:
    """float32, bfloat16 and (where this torch has it) int8 GFLOP/s of one model-shaped product on this CPU;
    measured once, then read from cache."""
    import torch

    key = hashlib.sha256(json.dumps([CALIBRATION_FORMAT, cpu_name(), torch.__version__, torch.get_num_threads(),
                                     CALIBRATION_SHAPE]).encode()).hexdigest()[:16]
    path = cache_root(cache_dir) / f"precision-{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        pass
    from agents.lm.cpu_kernels import int8_linear_available

    kinds = (torch.float32, torch.bfloat16, *(("int8",) if int8_linear_available() else ()))
    measured = measure_gflops(kinds, *CALIBRATION_SHAPE)
    result = {"cpu": cpu_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "shape": list(CALIBRATION_SHAPE), **{f"{name}_gflops": gflops for name, gflops in measured.items()}}
    try:
        atomic_write_text(path, json.dumps(result))
    except OSError as err:  # an unwritable cache costs a re-measure next time, nothing else
        log.warning("cannot cache the precision calibration in %s: %s", path, err)
    log.info("precision calibration: %s", result)
    return result


def measure_gflops(kinds: Sequence, rows: int, n_in: int, n_out: int, seconds: float = 0.5) -> dict[str, float]:
    """GFLOP/s of ``linear((rows, n_in), (n_out, n_in))`` per kind, keyed 'float32', 'bfloat16', 'int8':
    the best of repeated timings within ``seconds``, a budget the kinds share. A kind is a torch
    dtype, or "int8" for the int8 precision's product (agents/lm/cpu_kernels.int8_linear, GOP/s).

    The kinds are timed in alternation, one product each in turn, so that a load they share
    (another job on the cores, a clock still ramping up) slows them alike: their ratio, which
    ``choose_precision`` decides by, holds even when the absolute figures do not.
    """
    import torch

    if len(set(kinds)) != len(kinds) or not kinds:
        raise ValueError(f"kinds must be distinct and at least one, got {list(kinds)}")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n_in, generator=generator)
    weight = torch.randn(n_out, n_in, generator=generator)
    products = {}
    for kind in kinds:
        if kind == "int8":
            from agents.lm.cpu_kernels import int8_linear, int8_pack

            products["int8"] = functools.partial(int8_linear, x, int8_pack(weight))
        else:
            products[str(kind).removeprefix("torch.")] = functools.partial(torch.nn.functional.linear, x.to(kind),
                                                                           weight.to(kind))
    for product in products.values():
        product()  # warm-up: kernel selection, packing
    best = dict.fromkeys(products, float("inf"))
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for name, product in products.items():
            start = time.perf_counter()
            product()
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


def load_in_precision(spec: str, precision: str = "auto", reduced: Sequence[str] = REDUCED):
    """``load_model(spec)`` in the precision ``precision`` resolves to on this device; (LoadedModel, PrecisionChoice)."""
    from agents.lm.models import load_model, pick_device

    choice = choose_precision(precision, pick_device(None).type, reduced=reduced)
    return load_model(spec, dtype=choice.used), choice
