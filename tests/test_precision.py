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


def test_auto_takes_the_first_reduced_precision_the_calibration_finds_fast_enough(tmp_path, monkeypatch):
    """bfloat16 where it is at least 1.5x float32, else int8 where that is, else float32."""
    def calibration(bf16: float, int8: float):
        def measure(kinds, *_shape, **_kwargs):
            assert tuple(kinds) == (torch.float32, torch.bfloat16, "int8")  # all, timed together
            return {"float32": 10.0, "bfloat16": bf16, "int8": int8}
        return measure

    monkeypatch.setattr("agents.lm.cpu_kernels.int8_linear_available", lambda: True)
    for bf16, int8, expected in ((40.0, 30.0, "bfloat16"), (2.0, 25.0, "int8"), (12.0, 12.0, "float32")):
        monkeypatch.setattr("agents.lm.precision.measure_gflops", calibration(bf16, int8))
        cache = tmp_path / f"{bf16}-{int8}"
        choice = choose_precision("auto", "cpu", cache_dir=cache)
        assert choice.used == expected
        assert f"bfloat16 {bf16 / 10:.1f}x, int8 {int8 / 10:.1f}x float32" in choice.reason
        # Cached: measured once per CPU, torch version and thread count.
        monkeypatch.setattr("agents.lm.precision.measure_gflops", lambda *_a, **_k: pytest.fail("measured again"))
        assert cpu_calibration(cache)["int8_gflops"] == int8
        (saved,) = cache.rglob("precision-*.json")
        assert json.loads(saved.read_text())["float32_gflops"] == 10.0
    # A torch without fbgemm's int8 kernels: the calibration times the other two and never picks int8.
    monkeypatch.setattr("agents.lm.cpu_kernels.int8_linear_available", lambda: False)
    monkeypatch.setattr("agents.lm.precision.measure_gflops",
                        lambda kinds, *_a, **_k: {"float32": 10.0, "bfloat16": 2.0} if len(kinds) == 2 else pytest.fail())
    assert choose_precision("auto", "cpu", cache_dir=tmp_path / "no-int8").used == "float32"
    assert choose_precision("float32", "cpu").reason == "as requested"
    with pytest.raises(ValueError, match="precision must be one of"):
        choose_precision("int4", "cpu")


def test_int8_is_a_cpu_precision_asked_for_by_name(monkeypatch):
    from agents.lm.backend import BackendError, TorchBackend, make_backend
    from agents.lm.models import ModelLoadError, load_model

    assert choose_precision("int8", "cpu").used == "int8"
    with pytest.raises(ValueError, match="int8 runs on the CPU only"):
        choose_precision("int8", "cuda")
    loaded = load_model("tiny-random", dtype="int8")  # float32 weights, for training, decoded in int8
    assert loaded.int8 and loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    backend = make_backend("torch", loaded, None)
    assert isinstance(backend, TorchBackend) and backend.int8
    assert not make_backend("torch", load_model("tiny-random", dtype="float32"), None).int8
    with pytest.raises(BackendError, match="precision int8 decodes on the torch backend; llama.cpp serves"):
        make_backend("llama.cpp", loaded, None)
    monkeypatch.setattr("agents.lm.models.pick_device", lambda _requested: torch.device("cuda"))
    with pytest.raises(ModelLoadError, match="with dtype 'int8': precision int8 runs on the CPU only"):
        load_model("tiny-random", dtype="int8")


def test_auto_leaves_int8_out_for_llama_cpp_and_for_runs_saved_before_int8(tmp_path, monkeypatch):
    from agents.lm.precision import reduced_for
    from graph.evaluation.config import EvalConfig
    from graph.run_dir import RunSettings

    monkeypatch.setattr("agents.lm.cpu_kernels.int8_linear_available", lambda: True)
    monkeypatch.setattr("agents.lm.precision.measure_gflops",
                        lambda kinds, *_a, **_k: {"float32": 10.0, "bfloat16": 2.0, "int8": 25.0})
    assert choose_precision("auto", "cpu", cache_dir=tmp_path, reduced=reduced_for("torch")).used == "int8"
    assert choose_precision("auto", "cpu", cache_dir=tmp_path, reduced=reduced_for("llama.cpp")).used == "float32"
    saved_auto = reduced_for("torch", saved_auto=True)
    assert choose_precision("auto", "cpu", cache_dir=tmp_path, reduced=saved_auto).used == "float32"
    for make in (lambda: RunSettings(data="train", precision="int8", backend="llama.cpp"),
                 lambda: EvalConfig(precision="int8", backend="llama.cpp")):
        with pytest.raises(ValueError, match="precision int8 decodes on the torch backend; llama.cpp serves"):
            make()
    RunSettings(data="train", precision="int8", backend="torch")  # fine
