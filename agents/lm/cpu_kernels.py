"""Exact speedups of decode steps on CPU: they change arithmetic order at most, never precision.

``ExactGreedyHead`` ranks the vocabulary with a bfloat16 copy of the output projection and
re-scores the best candidates in float32; ``PackedLinears`` gives the frozen float32 linear
layers MKL's pre-packed weight layout for the one batch shape decode steps run most;
``PrepackedBfloat16Linears`` gives bfloat16 layers oneDNN's blocked weight layout for every
batch shape. ``Int8Linears`` is the one that changes precision (``--precision int8``, or
``auto`` where the calibration finds it fast): 8-bit copies of float32 layers for inference
calls. None applies to training (gradients flow through the plain layers) and each falls
back to the plain path where the hardware or library lacks what it needs.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator

import torch
from torch import nn


class ExactGreedyHead:
    """Greedy tokens from float32 hidden states without the full float32 vocabulary product.

    The output projection is a large share of a float32 decode step (152k x 896 for Qwen 0.5B).
    A bfloat16 copy of it, which CPUs with AMX or AVX512-BF16 multiply several times faster,
    ranks the vocabulary; the top ``candidates`` are re-scored exactly in float32. The float32
    winner is the true argmax unless some other token could reach it within the bfloat16
    rounding bound: bfloat16 keeps
    8 significant bits, so each product h_i * w_i is off by at most 2u|h_i w_i| (u = 2^-8) and
    their sum by 2u ||h|| ||w|| (Cauchy-Schwarz), plus u of the rounded result. Rows where the
    bound cannot rule that out (rare) take the full float32 product, so the result is
    float32 greedy decoding either way, up to summation order.
    """

    MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")  # logits = lm_head(h)
    UNIT = 2.0**-8  # bfloat16 unit roundoff
    SAFETY = 2.0  # the bound is doubled: the kernels' own accumulation order is not ours to see

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, candidates: int = 8):
        self.weight, self.bias, self.candidates = weight, bias, candidates  # (vocab, hidden), (vocab,)
        self.fallbacks = 0  # rows that needed the full product, for benchmarks and tests
        self._screen_version = -1
        self._refresh()

    def _refresh(self) -> None:
        """(Re)make the bfloat16 copy, also after an in-place change of the weight (a tied embedding trained)."""
        if self._screen_version != self.weight._version:
            self.screen = self.weight.detach().to(torch.bfloat16)
            self.max_row_norm = float(self.weight.detach().norm(dim=1).max())
            self._screen_version = self.weight._version

    @classmethod
    def for_model(cls, model) -> ExactGreedyHead | None:
        """A head for models whose logits are a plain linear map of the last hidden state, on a CPU with
        fast bfloat16 (AMX or AVX512-BF16); None elsewhere (the model's own full product is used)."""
        head = model.get_output_embeddings()
        if type(model).__name__ not in cls.MODELS or type(head) is not torch.nn.Linear:
            return None
        if head.weight.device.type != "cpu" or head.weight.dtype != torch.float32 or not _fast_bfloat16():
            return None
        return cls(head.weight, head.bias)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(hidden, self.weight, self.bias)

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, hidden) float32 -> (rows,) token ids."""
        self._refresh()
        hidden = hidden.float()
        approx = torch.nn.functional.linear(hidden.to(torch.bfloat16), self.screen).float()  # (rows, vocab)
        if self.bias is not None:
            approx += self.bias
        values, ids = approx.topk(self.candidates + 1, dim=-1)  # (rows, k + 1)
        candidates = ids[:, : self.candidates]  # (rows, k)
        exact = torch.einsum("rh,rkh->rk", hidden, self.weight[candidates])  # (rows, k)
        if self.bias is not None:
            exact += self.bias[candidates]
        best, where = exact.max(dim=-1)  # (rows,)
        # The highest any other token's float32 logit can be: the (k+1)-th screened value, undone
        # from its own rounding, plus the products' rounding bound.
        rest = values[:, self.candidates]
        u = self.UNIT
        bound = rest + u * rest.abs() / (1 - u) + self.SAFETY * (2 * u + u * u) * hidden.norm(dim=-1) * self.max_row_norm
        tokens = candidates.gather(1, where.unsqueeze(1)).squeeze(1)
        unsure = best <= bound
        if bool(unsure.any()):
            self.fallbacks += int(unsure.sum())
            tokens[unsure] = self.logits(hidden[unsure]).argmax(dim=-1)
        return tokens


def _fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (elsewhere a bfloat16 product is slower than float32)."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


class _RelaidLinears:
    """Frozen nn.Linear layers whose forward, inside ``swapped()``, reads a re-laid-out copy of the weight.

    A copy is made on first use and remade when its weight changes in place (the weight's
    version counter), so training a tied embedding or loading new weights is always seen.
    """

    def __init__(self, layers: list[nn.Linear]):
        self.layers = layers
        self._copies: dict[int, tuple[int, torch.Tensor]] = {}  # id(layer) -> (weight version, copy)

    def _relaid(self, layer: nn.Linear) -> torch.Tensor:
        raise NotImplementedError

    def _forward(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        saved = [layer.__dict__.get("forward") for layer in self.layers]
        for layer in self.layers:
            layer.forward = functools.partial(self._forward, layer)
        try:
            yield
        finally:
            for layer, previous in zip(self.layers, saved):
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous

    @contextlib.contextmanager
    def applied(self, rows: int) -> Iterator[None]:
        """Inside the block the layers use their copies (at any ``rows``; never for training)."""
        if torch.is_grad_enabled():
            yield
            return
        with self.swapped():
            yield

    def _copy(self, layer: nn.Linear) -> torch.Tensor:
        version = layer.weight._version
        cached = self._copies.get(id(layer))
        if cached is None or cached[0] != version:
            cached = (version, self._relaid(layer))
            self._copies[id(layer)] = cached
        return cached[1]


class PackedLinears(_RelaidLinears):
    """MKL-packed float32 weights of a model's frozen nn.Linear layers, for calls of exactly ``rows`` rows.

    MKL's packed GEMM runs decode-shaped products (32 x 896 by 896 x 4864) faster than the
    plain call (bench/bench_generation.py), but only for the row count the weights were packed
    for; other shapes (prefill, a part-filled batch) take the plain path. A pack takes about
    1.75x the weight's memory.
    """

    def __init__(self, model: nn.Module, rows: int, exclude: tuple[nn.Module, ...] = ()):
        super().__init__([
            m for m in model.modules()
            if type(m) is nn.Linear and all(m is not e for e in exclude)
            and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
        ])
        self.rows = rows

    @classmethod
    def for_model(cls, model: nn.Module, rows: int, exclude: tuple[nn.Module, ...] = ()) -> PackedLinears | None:
        """Packed layers where torch was built with MKL and the model runs in float32 on the CPU; else None."""
        if rows < 2 or not torch.backends.mkl.is_available() or not hasattr(torch.ops.mkl, "_mkl_linear"):
            return None
        packed = cls(model, rows, exclude)
        return packed if packed.layers else None

    @contextlib.contextmanager
    def applied(self, rows: int) -> Iterator[None]:
        """Inside the block, the layers use their packs when called on ``rows`` rows (and not for training)."""
        if rows != self.rows or torch.is_grad_enabled():
            yield
            return
        with self.swapped():
            yield

    def _relaid(self, layer: nn.Linear) -> torch.Tensor:
        return torch.ops.mkl._mkl_reorder_linear_weight(layer.weight.detach(), self.rows)

    def _forward(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] != self.rows:
            return nn.functional.linear(x, layer.weight, layer.bias)
        return torch.ops.mkl._mkl_linear(x, self._copy(layer), layer.weight, layer.bias, self.rows)


class PrepackedBfloat16Linears(_RelaidLinears):
    """oneDNN-reordered copies of a bfloat16 model's frozen nn.Linear weights, used by calls without autograd.

    A plain bfloat16 ``F.linear`` on CPU hands oneDNN the weight in its plain layout on every
    call; given the weight already in oneDNN's own layout, decode-shaped products run faster
    (bench/bench_decode.py), and a decode step reads every weight of the model. Same
    precision as the plain call (bfloat16 products, float32 sums), any row count; at some row
    counts oneDNN picks another blocking for the two layouts, and sums in another order. A
    copy takes the weight's own memory again.
    """

    @classmethod
    def for_model(cls, model: nn.Module) -> PrepackedBfloat16Linears | None:
        """Packed layers for a bfloat16 model on a CPU whose torch has oneDNN's linear ops; else None."""
        layers = [m for m in model.modules()
                  if type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"]
        if not layers or not torch.backends.mkldnn.is_available() or not _onednn_bfloat16_linear_works():
            return None
        return cls(layers)

    def _relaid(self, layer: nn.Linear) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)

    def _forward(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.bfloat16:
            return nn.functional.linear(x, layer.weight, layer.bias)
        flat = x.reshape(-1, x.shape[-1])  # (rows, in)
        out = torch.ops.mkldnn._linear_pointwise(flat, self._copy(layer), layer.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., out)


@functools.lru_cache(maxsize=1)
def _onednn_bfloat16_linear_works() -> bool:
    """Whether this torch build runs oneDNN's reordered bfloat16 linear, and agrees with the plain call."""
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 16, generator=generator).to(torch.bfloat16)
    x = torch.randn(3, 16, generator=generator).to(torch.bfloat16)
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    except RuntimeError:
        return False
    return torch.allclose(out.float(), nn.functional.linear(x, weight).float(), rtol=2**-7, atol=2**-7)


class Int8Linears(_RelaidLinears):
    """8-bit copies of a float32 model's nn.Linear layers (the output projection included), for calls
    without autograd: int8 weights, int8 activations, exact int32 sums (fbgemm's dynamic linear).

    Weights are quantized per output channel (scale = the row's largest magnitude / 127).
    Activations are quantized per row: each row is divided by its largest magnitude, and a pin
    row (-1 and 1) is appended so that the kernel's per-tensor range is always [-1, 1]. So a
    row's product depends on that row alone, never on what else is in the call, and an integer
    sum has no order to differ by. (Whole texts still depend on the call: the float32 attention
    between the layers sums in an order that varies with the call's widths, and a last-bit
    difference there can move an activation across a rounding step.) The kernel keeps
    activations to 7 bits (``reduce_range``), which CPUs without VNNI need to keep their 16-bit
    partial sums from saturating.

    This changes answers, as bfloat16 does: bench/bench_precision.py judges it by accuracy.
    The float32 weights stay for training, so the copies add about a quarter of their memory.
    """

    @classmethod
    def for_model(cls, model: nn.Module) -> Int8Linears | None:
        """Copies for a float32 model's CPU linear layers where this torch has fbgemm's int8 kernels; else None."""
        layers = [m for m in model.modules()
                  if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
        if not layers or not int8_linear_available():
            return None
        return cls(layers)

    def _relaid(self, layer: nn.Linear) -> torch.Tensor:
        return int8_pack(layer.weight.detach())

    def _forward(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 or torch.is_grad_enabled():  # no gradient flows through int8 products
            return nn.functional.linear(x, layer.weight, layer.bias)
        out = int8_linear(x.reshape(-1, x.shape[-1]), self._copy(layer))  # (rows, out)
        if layer.bias is not None:
            out += layer.bias
        return out.view(*x.shape[:-1], out.shape[-1])


def int8_pack(weight: torch.Tensor):
    """fbgemm's packed int8 weight, one scale per output channel (symmetric, zero point 0)."""
    scales = (weight.abs().amax(dim=1).clamp(min=1e-12) / 127).double()  # (out,)
    with warnings.catch_warnings():  # torch marks its quantized-tensor API deprecated; it is the fbgemm path
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight, scales, torch.zeros_like(scales, dtype=torch.long), 0,
                                               torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None)


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """(rows, in) float32 times a packed int8 weight, each row quantized on its own scale (see ``Int8Linears``)."""
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # (rows, 1)
    pin = x.new_zeros(1, x.shape[1])
    pin[0, 0], pin[0, -1] = -1.0, 1.0  # fixes the kernel's per-tensor range at [-1, 1]
    out = torch.ops.quantized.linear_dynamic(torch.cat([x / scale, pin]), packed, True)  # reduce_range
    return out[:-1] * scale


@functools.lru_cache(maxsize=1)
def int8_linear_available() -> bool:
    """Whether this torch build has fbgemm's dynamic int8 linear, and it agrees with float32 to int8 accuracy."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    if not (hasattr(torch.ops.quantized, "linear_prepack") and hasattr(torch.ops.quantized, "linear_dynamic")):
        return False
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 32, generator=generator)
    x = torch.randn(3, 32, generator=generator)
    try:
        out = int8_linear(x, int8_pack(weight))
    except RuntimeError:
        return False
    exact = nn.functional.linear(x, weight)
    return bool((out - exact).abs().max() <= 0.05 * exact.abs().max())
