"""The router: a small MLP from prompt features to a distribution over experts.

Its input is [context features ; memory features]. Context features are the mean-pooled
last hidden state of the prompt under the frozen model (bank bypassed), computed by
``context_features`` — the one feature function used both in training and at inference.
Memory features are a vector the caller supplies (zeros when there is no history).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapters.bank import ExpertBank
from agents.errors import AdapterError

ROUTING_MODES = ("dense", "top-k", "forced")


@dataclass
class RouterConfig:
    hidden_dim: int = 128  # width of the router MLP
    memory_dim: int = 0  # size of the caller's memory feature vector (0: none)
    temperature: float = 1.0  # softmax temperature over router logits
    # "top-k" (the loop's mixture: the best top_k experts, renormalised), "dense" softmax, or "forced" single expert
    mode: str = "top-k"
    top_k: int = 2  # experts kept in top-k mode
    prior_strength: float = 1.0  # exponent of the caller's prior in the Bayesian blend
    seed: int = 0  # seeds the MLP init

    def __post_init__(self) -> None:
        if self.hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {self.hidden_dim}")
        if self.memory_dim < 0:
            raise ValueError(f"memory_dim must be >= 0, got {self.memory_dim}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {ROUTING_MODES}, got {self.mode!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.prior_strength < 0:
            raise ValueError(f"prior_strength must be >= 0, got {self.prior_strength}")

    def to_dict(self) -> dict:
        return asdict(self)


class Router(nn.Module):
    def __init__(self, context_dim: int, n_experts: int, config: RouterConfig | None = None):
        super().__init__()
        self.config = config or RouterConfig()
        self.context_dim = context_dim
        self.n_experts = n_experts
        in_dim = context_dim + self.config.memory_dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            # LayerNorm first: hidden-state scales differ a lot between models.
            self.net = nn.Sequential(
                nn.LayerNorm(in_dim),
                nn.Linear(in_dim, self.config.hidden_dim),
                nn.GELU(),
                nn.Linear(self.config.hidden_dim, n_experts),
            )

    def forward(self, context: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """Router logits (batch, n_experts) for context (batch, context_dim) and memory (batch, memory_dim)."""
        if context.dim() != 2 or context.shape[1] != self.context_dim:
            raise AdapterError(f"context features must be (batch, {self.context_dim}), got {tuple(context.shape)}")
        memory_dim = self.config.memory_dim
        if memory is None:
            memory = context.new_zeros(context.shape[0], memory_dim)  # (batch, memory_dim)
        elif memory.dim() == 1:
            memory = memory.unsqueeze(0).expand(context.shape[0], -1)  # (batch, memory_dim)
        if memory.shape != (context.shape[0], memory_dim):
            raise AdapterError(f"memory features must be (batch, {memory_dim}), got {tuple(memory.shape)}")
        features = torch.cat([context, memory.to(context.dtype)], dim=-1)  # (batch, context + memory)
        return self.net(features.to(self.net[1].weight.dtype))  # (batch, n_experts)

    def weights(
        self,
        logits: torch.Tensor,
        *,
        mode: str | None = None,
        forced_expert: int | None = None,
        prior: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mixture weights from logits, per the routing mode; rows sum to 1."""
        return routing_weights(
            logits,
            mode=mode or self.config.mode,
            temperature=self.config.temperature,
            top_k=self.config.top_k,
            forced_expert=forced_expert,
            prior=prior,
            prior_strength=self.config.prior_strength,
        )


def routing_weights(
    logits: torch.Tensor,
    *,
    mode: str = "dense",
    temperature: float = 1.0,
    top_k: int = 2,
    forced_expert: int | None = None,
    prior: torch.Tensor | None = None,
    prior_strength: float = 1.0,
) -> torch.Tensor:
    """Turn router logits (batch, n) into mixture weights (batch, n) that sum to 1 per row.

    With a prior (n,) or (batch, n) the router's distribution is treated as a likelihood and
    blended into a posterior, p(e | x) ∝ p_router(e | x) * prior(e) ** prior_strength.
    """
    n = logits.shape[-1]
    if mode == "forced":
        if forced_expert is None or not 0 <= forced_expert < n:
            raise AdapterError(f"forced routing needs an expert index in [0, {n}), got {forced_expert}")
        weights = torch.zeros_like(logits)
        weights[:, forced_expert] = 1.0
        return weights
    log_p = torch.log_softmax(logits / temperature, dim=-1)  # (batch, n)
    if prior is not None:
        prior = prior.to(log_p)
        if prior.shape[-1] != n or (prior < 0).any() or not (prior.sum(-1) > 0).all():
            raise AdapterError(f"prior must be non-negative with {n} entries and a positive sum")
        prior = prior / prior.sum(-1, keepdim=True)
        log_p = torch.log_softmax(log_p + prior_strength * torch.log(prior.clamp_min(1e-12)), dim=-1)
    if mode == "dense":
        return log_p.exp()
    if mode == "top-k":
        k = min(top_k, n)
        top = log_p.topk(k, dim=-1)
        kept = torch.full_like(log_p, float("-inf")).scatter(-1, top.indices, top.values)  # (batch, n)
        return torch.softmax(kept, dim=-1)  # renormalised over the k kept experts
    raise AdapterError(f"unknown routing mode {mode!r}; expected one of {ROUTING_MODES}")


@torch.no_grad()
def context_features(
    model: nn.Module, bank: ExpertBank, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean-pooled last hidden state of the prompt under the frozen model, (batch, hidden).

    The bank is bypassed so the features do not drift as the experts train: the router
    sees the same features for the same prompt before and after an update.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    with bank.bypass():
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (batch, seq, h)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)  # (batch, h)
    return pooled.float()
