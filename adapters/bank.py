"""A bank of LoRA experts injected into the target linear layers of a frozen model.

Each wrapped layer keeps its base layer and adds the mixture of expert deltas

    out = base(x) + sum_n w_n * B_n A_n x * scaling

computed for all active experts at once (two matmuls over the stacked experts), with weights ``w``
per sequence (LoRA: Hu et al. 2021, https://arxiv.org/abs/2106.09685; injection as in
PEFT's ``LoraLayer``). B starts at zero, so step 0 equals the base model exactly.

The mixture reaches the layers through ``ExpertBank.route(weights)``, a context manager
owned by the bank: it is set for the duration of one call and cleared afterwards, so
nothing leaks from one call into the next.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from agents.errors import AdapterError

log = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"


@dataclass
class BankConfig:
    n_experts: int = 16  # experts in the bank
    rank: int = 8  # LoRA rank of each expert
    alpha: float = 16.0  # LoRA alpha; the delta is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input during training
    # "all-linear": every nn.Linear except the output embedding (attention and MLP
    # projections in Llama/Qwen); or a list of exact module leaf names, e.g. ["q_proj", "v_proj"].
    target_modules: str | list[str] = ALL_LINEAR
    shared_expert: int = 0  # the expert the stress controller trains in Single mode
    seed: int = 0  # seeds the kaiming init of A, so a bank is reproducible

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.shared_expert < self.n_experts:
            raise ValueError(
                f"shared_expert must be in [0, {self.n_experts}), got {self.shared_expert}"
            )
        if isinstance(self.target_modules, str):
            if self.target_modules != ALL_LINEAR:
                raise ValueError(
                    f"target_modules must be {ALL_LINEAR!r} or a list of module names, "
                    f"got {self.target_modules!r}"
                )
        elif not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Mixture:
    """Expert weights for one forward call, prepared once and read by every wrapped layer."""

    # (batch or 1, n_active * rank): each active expert's weight, repeated over its rank
    # rows and multiplied by alpha / rank, so a layer applies the mixture with one multiply.
    row_scale: torch.Tensor | None
    active: torch.Tensor | None  # (n_active,) expert indices, or None when all experts are active
    bypass: bool = False  # True: the bank adds nothing (the bare frozen model)
    active_key: tuple[int, ...] | None = None  # the same indices, hashable: what a layer's gathered factors are for
    pruned: bool = False  # experts with B = 0 were left out (exact without autograd only; see ExpertBank.route)


@dataclass
class _RoutingSlot:
    """The bank's own slot for the current mixture; only ExpertBank.route writes it."""

    mixture: Mixture | None = None
    stack: list = field(default_factory=list)


class LoRABankLinear(nn.Module):
    """An nn.Linear wrapped with a bank of LoRA experts (the PEFT way: base layer kept)."""

    def __init__(self, base_layer: nn.Linear, config: BankConfig, slot: _RoutingSlot, generator: torch.Generator):
        super().__init__()
        self.base_layer = base_layer
        self.n_experts = config.n_experts
        self.rank = config.rank
        self.scaling = config.scaling
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self._slot = slot
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        # Adapters stay float32 whatever the base dtype: tiny updates vanish in bf16.
        device = base_layer.weight.device
        a = torch.empty(config.n_experts, config.rank, self.in_features)  # (n, r, in)
        for n in range(config.n_experts):
            # PEFT's default A init: kaiming_uniform_(a=sqrt(5)) on a (rank, in) matrix.
            bound = 1.0 / math.sqrt(self.in_features)  # what kaiming_uniform(a=sqrt(5)) gives
            a[n].uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device))
        # B is stored (n, r, out) so that the second einsum reads it without a transpose copy.
        self.lora_B = nn.Parameter(torch.zeros(config.n_experts, config.rank, self.out_features, device=device))
        # The active experts' factors gathered for inference, kept while the same experts stay
        # active and unchanged: a decode call routes every step anew, and gathering them each
        # time was a large share of a step (bench/bench_decode.py). Keyed by the parameters' in-place versions, so an update,
        # a rollback or a load is always seen (and their storage, for a replaced tensor).
        self._gathered: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None
        self._cast: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None  # the same, in the model's dtype
        # Set by ExpertBank.training_one: (expert, its A (r, in), its B (r, out)) as leaf tensors
        # that the optimizer steps while that expert alone is active.
        self._trained: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        mixture = self._slot.mixture
        if mixture is None:
            raise AdapterError(
                "the expert bank was called without a mixture: wrap the call in "
                "bank.route(weights) or bank.bypass()"
            )
        if mixture.pruned and torch.is_grad_enabled():
            raise AdapterError("a mixture routed without autograd was used with autograd on: route inside the grad mode "
                               "the forward pass runs in (untrained experts were left out of it)")
        if mixture.bypass:
            return out
        scale = mixture.row_scale  # (batch or 1, k*r)
        if scale.shape[0] not in (1, x.shape[0]):
            raise AdapterError(f"mixture weights have batch size {scale.shape[0]} but the input has {x.shape[0]}")
        if out.dtype != torch.float32 and not torch.is_grad_enabled() and self._trained is None:
            return self._add_delta_in_place(x, out, mixture)
        flat_a, flat_b = self._factors(mixture)  # (k*r, in), (k*r, out)
        # The einsums "bsi,kri->bskr" and "bskr,kro->bso" over all active experts at once,
        # written as matmuls over the flattened (expert, rank) axis: torch.einsum copied B
        # on every call, which was slower at decode shapes on CPU (measured: README, "Expert bank cost").
        h = F.linear(self.dropout(x).to(flat_a.dtype), flat_a)  # (batch, [seq,] k*r)
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])  # (batch, [seq,] k*r)
        delta = torch.matmul(h, flat_b)  # (batch, [seq,] out)
        return out + delta.to(out.dtype)

    def _add_delta_in_place(self, x: torch.Tensor, out: torch.Tensor, mixture: Mixture) -> torch.Tensor:
        """Inference in a reduced precision: the delta in the model's dtype, accumulated into ``out``.

        The float32 path makes a float32 (tokens, out) delta, converts it and adds it: three
        passes over the largest tensor of the layer, the bank's main cost at prefill. Here the
        factors are kept in the model's dtype and one fused product adds the delta to the base
        output (the product accumulates in float32; A, the scales and the rank-sized hidden
        values are rounded to the model's dtype, as the base layer's own inputs are). Float32
        models keep the exact path above, so their outputs are unchanged.
        """
        flat_a, flat_b = self._factors_as(mixture, out.dtype)  # (k*r, in), (k*r, out)
        scale = mixture.row_scale.to(out.dtype)  # (batch or 1, k*r)
        h = F.linear(self.dropout(x).to(out.dtype), flat_a)  # (batch, [seq,] k*r)
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])
        if not out.is_contiguous():
            out = out.contiguous()
        out.view(-1, self.out_features).addmm_(h.reshape(-1, h.shape[-1]), flat_b)
        return out

    def _factors_as(self, mixture: Mixture, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The active experts' factors in ``dtype``, kept while the experts stay the same (as in _factors)."""
        key = (mixture.active_key, dtype, self.lora_A._version, self.lora_B._version,
               self.lora_A.data_ptr(), self.lora_B.data_ptr())
        if self._cast is not None and self._cast[0] == key:
            return self._cast[1]
        a, b = (self.lora_A, self.lora_B) if mixture.active is None else (
            self.lora_A.index_select(0, mixture.active), self.lora_B.index_select(0, mixture.active))
        factors = (a.reshape(-1, self.in_features).to(dtype).contiguous(),
                   b.reshape(-1, self.out_features).to(dtype).contiguous())
        self._cast = (key, factors)
        return factors

    def _factors(self, mixture: Mixture) -> tuple[torch.Tensor, torch.Tensor]:
        """The active experts' A and B, flattened over (expert, rank)."""
        if self._trained is not None:
            expert, a, b = self._trained
            if mixture.active_key == (expert,) or (mixture.active is None and self.n_experts == 1):
                return a, b  # (r, in), (r, out)
            raise AdapterError(f"expert {expert} is being trained alone: a call inside training_one must route to it alone")
        if mixture.active is None:
            return self.lora_A.reshape(-1, self.in_features), self.lora_B.reshape(-1, self.out_features)  # views
        key = (mixture.active_key, self.lora_A._version, self.lora_B._version,
               self.lora_A.data_ptr(), self.lora_B.data_ptr())  # a replaced or moved tensor is seen too
        if not torch.is_grad_enabled() and self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1]
        # index_select copies only the k active experts; it beat advanced indexing here.
        factors = (self.lora_A.index_select(0, mixture.active).reshape(-1, self.in_features),
                   self.lora_B.index_select(0, mixture.active).reshape(-1, self.out_features))
        # Only kept without autograd, so training always reads the parameters themselves.
        self._gathered = None if torch.is_grad_enabled() else (key, factors)
        return factors

    def expert_delta_weight(self, expert: int) -> torch.Tensor:
        """The dense weight delta of one expert, (out, in), including the scaling."""
        return self.scaling * self.lora_B[expert].T @ self.lora_A[expert]  # (out, in)


def _find_targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, LoRABankLinear):
            continue
        if module is output_layer:
            continue  # the LM head is tied to the embeddings in small models; never adapt it
        leaf = name.rsplit(".", 1)[-1]
        if target_modules == ALL_LINEAR or leaf in target_modules:
            names.append(name)
    return names


class ExpertBank(nn.Module):
    """The LoRA experts of a model, injected in place, with the routing context for calls.

    The bank owns only adapter parameters; the base model stays frozen and is not a
    submodule of the bank (so the bank's state_dict holds adapters alone).
    """

    def __init__(self, model: nn.Module, config: BankConfig | None = None):
        super().__init__()
        self.config = config or BankConfig()
        self._slot = _RoutingSlot()
        names = _find_targets(model, self.config.target_modules)
        if not names:
            raise AdapterError(f"no linear layers matched target_modules={self.config.target_modules!r}")
        if isinstance(self.config.target_modules, list):
            missing = set(self.config.target_modules) - {n.rsplit(".", 1)[-1] for n in names}
            if missing:
                raise AdapterError(f"target_modules not found in the model: {sorted(missing)}")
        generator = torch.Generator().manual_seed(self.config.seed)
        self.layer_names: list[str] = names
        layers = []
        for name in names:
            parent_name, _, leaf = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = LoRABankLinear(getattr(parent, leaf), self.config, self._slot, generator)
            setattr(parent, leaf, wrapped)
            layers.append(wrapped)
        # Held in a plain list so the bank does not own (or save) the base layers.
        self._layers: list[LoRABankLinear] = layers
        self._untrained: tuple[tuple, torch.Tensor] | None = None  # (parameter versions, (n,) bool): see untrained()
        self._params = nn.ParameterDict()
        for name, layer in zip(names, layers):
            key = name.replace(".", "__")
            self._params[key + "__A"] = layer.lora_A
            self._params[key + "__B"] = layer.lora_B
        log.info("injected %d experts (rank %d) into %d layers", self.config.n_experts, self.config.rank, len(names))

    @property
    def layers(self) -> dict[str, LoRABankLinear]:
        return dict(zip(self.layer_names, self._layers))

    @property
    def n_experts(self) -> int:
        return self.config.n_experts

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters, found by module type (never by name)."""
        return [p for layer in self._layers for p in (layer.lora_A, layer.lora_B)]

    @contextlib.contextmanager
    def route(self, weights: torch.Tensor) -> Iterator[None]:
        """Apply the expert mixture ``weights`` (batch or 1, n_experts) to calls inside the block.

        Only experts with a non-zero weight somewhere in the batch are computed, so top-k
        and single-expert routing cost k experts, not all of them.
        """
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)  # (1, n)
        if weights.dim() != 2 or weights.shape[1] != self.n_experts:
            raise AdapterError(
                f"mixture weights must have shape (batch, {self.n_experts}), got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all():
            raise AdapterError("mixture weights contain NaN or inf")
        used = (weights != 0).any(dim=0)  # (n,)
        # Without autograd an expert whose B is zero adds exactly zero, so it is left out: a bank
        # that has trained a few experts costs only those (most of a new bank is untrained).
        # With autograd every routed expert stays, or an untrained one would never get a gradient.
        pruned = not torch.is_grad_enabled() and all(layer._trained is None for layer in self._layers)
        if pruned:
            used = used & ~self.untrained().to(used.device)
            if not bool(used.any()):
                with self._set(Mixture(row_scale=None, active=None, bypass=True, pruned=True)):
                    yield
                return
        active = None if bool(used.all()) else used.nonzero().flatten()  # (k,)
        kept = weights if active is None else weights[:, active]  # (batch or 1, k)
        row_scale = kept.repeat_interleave(self.config.rank, dim=1) * self.config.scaling  # (batch or 1, k*r)
        device = self._layers[0].lora_A.device
        mixture = Mixture(row_scale=row_scale.to(device), active=None if active is None else active.to(device),
                          active_key=None if active is None else tuple(active.tolist()), pruned=pruned)
        with self._set(mixture):
            yield

    def untrained(self) -> torch.Tensor:
        """(n_experts,) bool: True for an expert whose B is zero in every layer (it adds nothing).

        Recomputed only when a B changed: keyed by the parameters' in-place versions and storage,
        so an update, a rollback or a load is always seen.
        """
        key = tuple((layer.lora_B._version, layer.lora_B.data_ptr()) for layer in self._layers)
        if self._untrained is None or self._untrained[0] != key:
            with torch.no_grad():
                nonzero = torch.stack([layer.lora_B.ne(0).flatten(1).any(dim=1) for layer in self._layers]).any(dim=0)
            self._untrained = (key, ~nonzero.cpu())
        return self._untrained[1].clone()  # a caller's edit must not change the cached answer

    @contextlib.contextmanager
    def training_one(self, expert: int) -> Iterator[list[torch.Tensor]]:
        """Train one expert alone: yields its A and B of every layer as leaf tensors to optimize.

        A call that routes to this expert alone reads them; when the block ends they are
        copied into the bank. Gradients through the stacked parameters would fill a gradient
        the size of the whole bank on every backward pass (zeros for the other experts), and
        the optimizer would then step every expert; here both touch the one expert only.
        """
        if not 0 <= expert < self.n_experts:
            raise AdapterError(f"expert index {expert} is out of range [0, {self.n_experts})")
        if any(layer._trained is not None for layer in self._layers):
            raise AdapterError("training_one is already active on this bank")
        try:
            with torch.no_grad():
                for layer in self._layers:
                    layer._trained = (expert, layer.lora_A[expert].clone().requires_grad_(True),
                                      layer.lora_B[expert].clone().requires_grad_(True))
            yield [t for layer in self._layers for t in layer._trained[1:]]
        finally:
            with torch.no_grad():
                for layer in self._layers:
                    if layer._trained is not None:  # None: the setup failed before this layer
                        _, a, b = layer._trained
                        layer.lora_A[expert].copy_(a)
                        layer.lora_B[expert].copy_(b)
                    layer._trained = None

    @contextlib.contextmanager
    def bypass(self) -> Iterator[None]:
        """Run the bare frozen model: the bank adds nothing inside the block."""
        with self._set(Mixture(row_scale=None, active=None, bypass=True)):
            yield

    @contextlib.contextmanager
    def _set(self, mixture: Mixture) -> Iterator[None]:
        self._slot.stack.append(self._slot.mixture)
        self._slot.mixture = mixture
        try:
            yield
        finally:
            self._slot.mixture = self._slot.stack.pop()

    def one_hot(self, expert: int, batch: int = 1) -> torch.Tensor:
        """Weights that select a single expert, (batch, n_experts)."""
        if not 0 <= expert < self.n_experts:
            raise AdapterError(f"expert index {expert} is out of range [0, {self.n_experts})")
        weights = torch.zeros(batch, self.n_experts, device=self._layers[0].lora_A.device)
        weights[:, expert] = 1.0
        return weights

    def expert_norms(self) -> torch.Tensor:
        """Frobenius norm of each expert's B matrices summed over layers, (n_experts,): 0 = untrained."""
        with torch.no_grad():
            return torch.stack([layer.lora_B.pow(2).sum(dim=(1, 2)) for layer in self._layers]).sum(0).sqrt()
