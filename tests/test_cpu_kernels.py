"""The exact CPU speedups of decode steps: a screened greedy head, MKL-packed and oneDNN-reordered linear layers."""

import pytest
import torch
from torch import nn

from agents.lm.cpu_kernels import ExactGreedyHead, PackedLinears, PrepackedBfloat16Linears


def _head(vocab=3000, hidden=64, seed=0, bias=False):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=generator)
    b = torch.randn(vocab, generator=generator) if bias else None
    return ExactGreedyHead(weight, b), weight, b, generator


@pytest.mark.parametrize("bias", [False, True])
def test_greedy_is_the_float32_argmax(bias):
    head, weight, b, generator = _head(bias=bias)
    hidden = torch.randn(64, 64, generator=generator) * 3
    assert torch.equal(head.greedy(hidden), nn.functional.linear(hidden, weight, b).argmax(dim=-1))


def test_ties_below_bfloat16_resolution_fall_back_to_the_full_product():
    """Tokens whose rows differ by less than bfloat16 can see: the screen cannot rank them, the bound says so."""
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(64, generator=generator)
    weight = base.repeat(40, 1) + 1e-5 * torch.randn(40, 64, generator=generator)  # 40 near-copies
    head = ExactGreedyHead(weight, None)
    hidden = torch.randn(5, 64, generator=generator)
    assert torch.equal(head.greedy(hidden), (hidden @ weight.T).argmax(dim=-1))
    assert head.fallbacks == 5


def test_an_in_place_change_of_the_weight_is_seen():
    head, weight, _, generator = _head()
    hidden = torch.randn(8, 64, generator=generator)
    head.greedy(hidden)
    with torch.no_grad():
        weight[7] = hidden[0] * 10  # token 7 now wins row 0 by far
    assert int(head.greedy(hidden)[0]) == 7


def test_for_model_takes_plain_linear_heads_only(tiny):
    head = ExactGreedyHead.for_model(tiny.model)
    if head is not None:  # a CPU with fast bfloat16
        assert head.weight is tiny.model.get_output_embeddings().weight
    tiny.model.get_output_embeddings().weight.data = tiny.model.get_output_embeddings().weight.data.double()
    assert ExactGreedyHead.for_model(tiny.model) is None  # float32 only


def _stack():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16, bias=False))


def test_packed_layers_match_plain_ones_and_are_restored():
    model = _stack()
    packed = PackedLinears.for_model(model, rows=6)
    if packed is None:
        pytest.skip("torch without MKL")
    x = torch.randn(6, 1, 32)
    with torch.no_grad():
        plain = model(x)
        with packed.applied(6):
            assert all("forward" in layer.__dict__ for layer in packed.layers)
            fast = model(x)
            other_rows = model(torch.randn(3, 1, 32))  # a shape it was not packed for: the plain path
        assert all("forward" not in layer.__dict__ for layer in packed.layers)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert other_rows.shape == (3, 1, 16)
    with torch.no_grad(), packed.applied(5):  # other row counts leave the layers alone
        assert all("forward" not in layer.__dict__ for layer in packed.layers)
    with packed.applied(6):  # gradients need the plain layers
        assert all("forward" not in layer.__dict__ for layer in packed.layers)


def test_packs_are_remade_after_the_weight_changes():
    model = _stack()
    packed = PackedLinears.for_model(model, rows=4)
    if packed is None:
        pytest.skip("torch without MKL")
    x = torch.randn(4, 32)
    with torch.no_grad():
        with packed.applied(4):
            model(x)
        model[0].weight.mul_(2)
        with packed.applied(4):
            fast = model(x)
        torch.testing.assert_close(fast, model(x), rtol=1e-5, atol=1e-5)


def _bfloat16_stack():
    return _stack().to(torch.bfloat16)


def test_reordered_bfloat16_layers_match_the_plain_ones_at_every_row_count_and_are_restored():
    model = _bfloat16_stack()
    packed = PrepackedBfloat16Linears.for_model(model)
    if packed is None:
        pytest.skip("torch without oneDNN's bfloat16 linear")
    assert PrepackedBfloat16Linears.for_model(_stack()) is None  # float32 layers are not its to take
    with torch.no_grad():
        for rows in (1, 3, 6, 64):
            x = torch.randn(rows, 1, 32).to(torch.bfloat16)
            plain = model(x)
            with packed.applied(rows):
                assert all("forward" in layer.__dict__ for layer in packed.layers)
                fast = model(x)
            torch.testing.assert_close(fast, plain)  # bfloat16 tolerances: the sums may run in another order
        assert all("forward" not in layer.__dict__ for layer in packed.layers)
    with packed.applied(6):  # gradients need the plain layers
        assert all("forward" not in layer.__dict__ for layer in packed.layers)


def test_reordered_weights_are_remade_after_the_weight_changes():
    model = _bfloat16_stack()
    packed = PrepackedBfloat16Linears.for_model(model)
    if packed is None:
        pytest.skip("torch without oneDNN's bfloat16 linear")
    before, after, plain = _before_and_after_doubling(model, packed, torch.randn(4, 32).to(torch.bfloat16))
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, plain)


def _before_and_after_doubling(model, copies, x):
    """The model's outputs through ``copies`` before and after its first weight doubles in place,
    and the plain layers' output after."""
    with torch.no_grad():
        with copies.applied(x.shape[0]):
            before = model(x)
        model[0].weight.mul_(2)
        with copies.applied(x.shape[0]):
            after = model(x)
        return before, after, model(x)


def _int8_or_skip(model):
    """The model's int8 layers; a skip only where torch lacks fbgemm (a broken kernel fails, never skips)."""
    from agents.lm.cpu_kernels import Int8Linears, int8_linear_available

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch without fbgemm's int8 kernels")
    assert int8_linear_available()
    return Int8Linears.for_model(model)


def test_int8_layers_are_near_float32_and_a_row_depends_on_itself_alone():
    """8-bit products: within int8 accuracy of float32, and per-row scales make a row's result its own:
    alone or beside a row a thousand times larger, it is the same to the bit."""
    model = _stack()
    int8 = _int8_or_skip(model)
    x = torch.randn(7, 1, 32)
    loud = torch.cat([x[:3], 1000 * torch.randn(4, 1, 32)])
    with torch.no_grad():
        plain = model(x)
        with int8.applied(7):
            assert all("forward" in layer.__dict__ for layer in int8.layers)
            quantized, alone, beside_loud = model(x), model(x[:1]), model(loud)
        assert all("forward" not in layer.__dict__ for layer in int8.layers)
    assert not torch.equal(quantized, plain)  # it is another precision
    assert (quantized - plain).abs().max() <= 0.05 * plain.abs().max()
    assert torch.equal(alone, quantized[:1]) and torch.equal(beside_loud[:3], quantized[:3])
    with int8.applied(7):  # gradients need the plain layers
        assert all("forward" not in layer.__dict__ for layer in int8.layers)
    with torch.inference_mode(), int8.applied(7):
        torch.testing.assert_close(model(x), quantized, rtol=0, atol=0)
    with int8.swapped():  # entered with gradients on: the layers still take the float32 path, which trains
        weight = model[0].weight.requires_grad_()
        model(x).sum().backward()
        assert weight.grad is not None and torch.count_nonzero(weight.grad) > weight.numel() // 2


def test_the_calibration_times_the_int8_product_beside_the_float32_one():
    from agents.lm.precision import measure_gflops

    _int8_or_skip(_stack())
    measured = measure_gflops((torch.float32, "int8"), 8, 64, 96, seconds=0.05)
    assert set(measured) == {"float32", "int8"} and all(v > 0 for v in measured.values())


def test_int8_copies_are_remade_after_the_weight_changes_and_skip_other_dtypes():
    from agents.lm.cpu_kernels import Int8Linears

    model = _stack()
    int8 = _int8_or_skip(model)
    assert Int8Linears.for_model(_bfloat16_stack()) is None  # float32 layers only
    before, after, plain = _before_and_after_doubling(model, int8, torch.randn(4, 32))
    assert not torch.allclose(after, before)
    assert (after - plain).abs().max() <= 0.05 * plain.abs().max()
