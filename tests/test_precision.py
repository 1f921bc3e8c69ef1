"""The start-up precision calibration: its choice, its cache, and a ratio that a shared load does not bias."""

import json
import time

import pytest
import torch

from agents.lm.precision import choose_precision, cpu_calibration, measure_gflops


class FakeClock:
    """A clock that only the fake matrix product advances: float32 costs 2 units, bfloat16 1, and
    every product before unit 60 costs 10 times as much (another job on the cores)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.order: list[torch.dtype] = []

    def perf_counter(self) -> float:
        return self.now

    def linear(self, x, weight):
        self.order.append(x.dtype)
        cost = 2.0 if x.dtype == torch.float32 else 1.0
        self.now += cost * (10 if self.now < 60 else 1)
        return x.new_zeros(x.shape[0], weight.shape[0])


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(time, "perf_counter", fake.perf_counter)  # the module precision.py times with
    monkeypatch.setattr(torch.nn.functional, "linear", fake.linear)
    return fake


def test_the_dtypes_are_timed_in_turn_so_a_passing_load_slows_both(clock):
    # Warm-ups end at unit 30, the load at 60, the window at 90. Timed one dtype after the other,
    # each for half the window, float32 would have had the whole load and bfloat16 none of it:
    # 20 units against 1, a 20x ratio. In turn, both are timed after the load too.
    measured = measure_gflops((torch.float32, torch.bfloat16), 2, 3, 4, seconds=60)
    timed = clock.order[2:]  # after one warm-up product each
    assert timed == [torch.float32, torch.bfloat16] * (len(timed) // 2) and len(timed) >= 4
    assert measured["bfloat16"] / measured["float32"] == pytest.approx(2.0)
    assert measured["float32"] == pytest.approx(2 * 2 * 3 * 4 / 2.0 / 1e9)
    with pytest.raises(ValueError, match="distinct"):
        measure_gflops((torch.float32, torch.float32), 2, 3, 4)


def test_auto_takes_bfloat16_only_when_the_calibration_finds_it_fast_enough(tmp_path, monkeypatch):
    def calibration(bf16: float):
        def measure(dtypes, *_shape, **_kwargs):
            assert tuple(dtypes) == (torch.float32, torch.bfloat16)  # both, timed together
            return {"float32": 10.0, "bfloat16": bf16}
        return measure

    for bf16, expected in ((40.0, "bfloat16"), (12.0, "float32")):
        monkeypatch.setattr("agents.lm.precision.measure_gflops", calibration(bf16))
        cache = tmp_path / expected
        choice = choose_precision("auto", "cpu", cache_dir=cache)
        assert choice.used == expected and f"{bf16 / 10:.1f}x float32" in choice.reason
        # Cached: measured once per CPU, torch version and thread count.
        monkeypatch.setattr("agents.lm.precision.measure_gflops", lambda *_a, **_k: pytest.fail("measured again"))
        assert cpu_calibration(cache)["bfloat16_gflops"] == bf16
        (saved,) = cache.rglob("precision-*.json")
        assert json.loads(saved.read_text())["float32_gflops"] == 10.0
    assert choose_precision("float32", "cpu").reason == "as requested"
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("int4", "cpu")
