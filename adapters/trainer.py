"""Test-time training of the expert bank and router over a frozen model.

``TestTimeTrainer.step`` is one optimizer step on a batch of (prompt, completion) texts:
causal-LM loss on the completion tokens only, a router cross-entropy toward the target
expert, and an optional KL penalty toward the frozen model's next-token distribution.
``TestTimeTrainer.update`` is a short burst of such steps under the stress controller,
with snapshot and rollback in Mirror mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Literal, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from adapters.bank import ExpertBank
from adapters.router import Router, context_features
from adapters.snapshot import BankSnapshot
from adapters.stress import StressController, StressMode
from agents.errors import TrainingError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TrainingExample:
    prompt: str  # conditioning text; its tokens are masked out of the LM loss
    completion: str  # the text the model learns to produce


@dataclass
class TrainerConfig:
    lm_weight: float = 1.0  # weight of the completion-only causal-LM loss
    router_weight: float = 0.1  # weight of the router cross-entropy toward the target expert
    kl_weight: float = 0.0  # weight of KL(base || adapted) on completion tokens; 0 = off
    max_grad_norm: float = 1.0  # gradient clipping
    weight_decay: float = 0.0  # AdamW decay; >0 would also shrink experts that are not trained
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    max_length: int = 512  # tokens per example after truncation (completion kept first)
    # "target": the LM loss runs through the target expert alone, so a burst trains one
    # expert; "router": through the router's dense mixture, so the LM loss trains the router too.
    lm_routing: Literal["target", "router"] = "target"
    steps_per_update: int = 3  # optimizer steps in one update burst
    micro_batch: int = 2  # texts per forward/backward pass; a step accumulates their gradients

    def __post_init__(self) -> None:
        for name in ("lm_weight", "router_weight", "kl_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lm_weight == 0 and self.router_weight == 0:
            raise ValueError("lm_weight and router_weight cannot both be 0")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.lm_routing not in ("target", "router"):
            raise ValueError(f"lm_routing must be 'target' or 'router', got {self.lm_routing!r}")
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.steps_per_update < 1:
            raise ValueError(f"steps_per_update must be >= 1, got {self.steps_per_update}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (batch, seq) prompt + completion, right-padded
    attention_mask: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq), IGNORE_INDEX on prompt and padding
    prompt_ids: torch.Tensor  # (batch, prompt_seq) prompts alone, left-padded, for router features
    prompt_mask: torch.Tensor  # (batch, prompt_seq)


class MicroBatches(NamedTuple):
    """Examples in micro-batches, one entry per batch in each list."""

    batches: list[Batch]
    predicted: list[int]  # completion tokens each batch predicts
    features: list[torch.Tensor | None]  # its rows of the prompt features (micro-batch, hidden), or None
    memory: list[torch.Tensor | None]  # its rows of the memory features (micro-batch, d), the shared (d,), or None


@dataclass
class UpdateResult:
    mode: str
    phi: float
    lr: float
    expert: int
    loss_before: float  # on the examples, before the burst
    loss_after: float  # on the examples, after the burst (after rollback, if any)
    guard_before: float  # on the guard texts (when none is given: the examples, and in Mirror mode the replay too)
    guard_after: float  # on the guard texts after the burst, before any rollback
    stress_rolled_back: bool  # the stress controller's mirror mode undid this burst (guard loss rose)
    steps: list[dict]
    replayed: int = 0  # earlier texts of the trained expert trained beside the examples


class TestTimeTrainer:
    """Trains only the bank's adapters and the router; the base model stays frozen."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        bank: ExpertBank,
        router: Router,
        config: TrainerConfig | None = None,
        stress: StressController | None = None,
    ):
        self.model, self.tokenizer, self.bank, self.router = model, tokenizer, bank, router
        self.config = config or TrainerConfig()
        self.stress = stress or StressController()
        self.device = next(model.parameters()).device
        for p in model.parameters():
            if p.requires_grad and not any(p is q for q in self.trainable_parameters()):
                raise TrainingError("the base model must be frozen (requires_grad=False) before training")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return self.bank.adapter_parameters() + list(self.router.parameters())

    def new_optimizer(self, lr: float, params: Sequence[torch.Tensor] | None = None) -> torch.optim.Optimizer:
        """AdamW over ``params`` (default: every trainable parameter)."""
        # A fresh optimizer per update burst: Adam moments from an earlier burst on another
        # expert would otherwise keep moving that expert on zero gradients.
        return torch.optim.AdamW(
            list(params) if params is not None else self.trainable_parameters(),
            lr=lr, betas=self.config.betas, weight_decay=self.config.weight_decay,
        )

    @contextlib.contextmanager
    def parameters_for(self, expert: int) -> Iterator[list[torch.Tensor]]:
        """What a burst on ``expert`` optimizes: that expert alone (through the bank's
        ``training_one``) and the router when the LM loss routes to the target expert; every
        parameter when it routes through the router's dense mixture."""
        if self.config.lm_routing != "target":
            yield self.trainable_parameters()
            return
        with self.bank.training_one(expert) as factors:
            yield factors + list(self.router.parameters())

    def prompt_features(self, examples: Sequence[TrainingExample]) -> torch.Tensor:
        """The router's features of each example's prompt, (n, hidden), in the steps' micro-batches.

        They depend on the frozen model alone, so an update computes them once for its
        loss before, its steps and its loss after.
        """
        if not examples:
            raise TrainingError("a training step needs at least one example")
        size = self.config.micro_batch
        with torch.no_grad():
            parts = []
            for i in range(0, len(examples), size):
                batch = self.tokenize(examples[i:i + size])
                parts.append(context_features(self.model, self.bank, batch.prompt_ids, batch.prompt_mask))
        return torch.cat(parts)  # (n, hidden)

    # ---------------------------------------------------------------- batching

    def tokenize(self, examples: Sequence[TrainingExample]) -> Batch:
        if not examples:
            raise TrainingError("a training step needs at least one example")
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        rows, prompts = [], []
        for ex in examples:
            prompt = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            completion = tok(ex.completion, add_special_tokens=False)["input_ids"] + eos
            if not completion:
                raise TrainingError(f"empty completion for prompt {ex.prompt[:60]!r}")
            # Keep the whole completion when possible; cut the prompt from the left.
            completion = completion[: self.config.max_length - 1]
            prompt = prompt[-(self.config.max_length - len(completion)) :] if prompt else []
            rows.append((prompt, completion))
            prompts.append(prompt or completion[:1])
        width = max(len(p) + len(c) for p, c in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (prompt, completion) in enumerate(rows):
            ids = prompt + completion
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(prompt) : len(ids)] = torch.tensor(completion)
            mask[i, : len(ids)] = 1
        p_width = max(len(p) for p in prompts)
        prompt_ids = torch.full((len(rows), p_width), pad, dtype=torch.long)
        prompt_mask = torch.zeros((len(rows), p_width), dtype=torch.long)
        for i, p in enumerate(prompts):
            prompt_ids[i, p_width - len(p) :] = torch.tensor(p)
            prompt_mask[i, p_width - len(p) :] = 1
        d = self.device
        return Batch(input_ids.to(d), mask.to(d), labels.to(d), prompt_ids.to(d), prompt_mask.to(d))

    # ---------------------------------------------------------------- losses

    def _losses(
        self, batch: Batch, target_expert: int, memory: torch.Tensor | None, features: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        n_rows = batch.input_ids.shape[0]
        if features is None:
            features = context_features(self.model, self.bank, batch.prompt_ids, batch.prompt_mask)  # (batch, h)
        logits = self.router(features, memory)  # (batch, n_experts)
        target = torch.full((n_rows,), target_expert, dtype=torch.long, device=logits.device)
        router_loss = F.cross_entropy(logits / self.router.config.temperature, target)
        if self.config.lm_routing == "target":
            weights = self.bank.one_hot(target_expert, n_rows)  # (batch, n_experts)
        else:
            weights = self.router.weights(logits, mode="dense")  # (batch, n_experts), carries router grads
        labels = batch.labels[:, 1:]  # (batch, seq-1)
        if self.config.kl_weight > 0:
            with self.bank.route(weights):
                out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            lm_logits = out.logits[:, :-1].float()  # (batch, seq-1, vocab)
            lm_loss = F.cross_entropy(lm_logits.reshape(-1, lm_logits.shape[-1]), labels.reshape(-1),
                                      ignore_index=IGNORE_INDEX)
        else:
            # The output projection only where a completion token is predicted: the full
            # (batch, seq, vocab) logits of a 150k vocabulary were most of a step's memory.
            with self.bank.route(weights):
                hidden = self.model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
            keep = labels != IGNORE_INDEX  # (batch, seq-1)
            picked = hidden[:, :-1][keep]  # (completion tokens, hidden)
            lm_logits = self.model.get_output_embeddings()(picked).float()  # (completion tokens, vocab)
            lm_loss = F.cross_entropy(lm_logits, labels[keep])  # no completion token: nan, refused by step()
        losses = {"lm": lm_loss, "router": router_loss}
        if self.config.kl_weight > 0:
            with torch.no_grad(), self.bank.bypass():
                base_logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            base_logp = torch.log_softmax(base_logits[:, :-1].float(), dim=-1)  # (batch, seq-1, vocab)
            logp = torch.log_softmax(lm_logits, dim=-1)  # (batch, seq-1, vocab)
            kl = (base_logp.exp() * (base_logp - logp)).sum(-1)  # (batch, seq-1)
            keep = (labels != IGNORE_INDEX).float()
            losses["kl"] = (kl * keep).sum() / keep.sum().clamp_min(1.0)
        return losses

    def _total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        cfg = self.config
        total = cfg.lm_weight * losses["lm"] + cfg.router_weight * losses["router"]
        if "kl" in losses:
            total = total + cfg.kl_weight * losses["kl"]
        return total

    # ---------------------------------------------------------------- training

    def step(
        self,
        examples: Sequence[TrainingExample],
        target_expert: int,
        optimizer: torch.optim.Optimizer,
        memory: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> dict:
        """One optimizer step on the optimizer's parameters. Refuses a non-finite loss or gradient
        and leaves parameters untouched. ``features``: the examples' ``prompt_features``, if known."""
        start = time.perf_counter()
        self.router.train()
        optimizer.zero_grad(set_to_none=True)
        # Micro-batches accumulate gradients: activations are kept for a few texts at a time.
        batches, predicted, parts_of, memory_of = self._micro_batches(examples, memory, features)
        n_predicted, n_rows = max(1, sum(predicted)), len(examples)
        losses: dict[str, float] = {}
        total_loss, tokens = 0.0, 0
        for batch, n, batch_features, batch_memory in zip(batches, predicted, parts_of, memory_of):
            parts = self._losses(batch, target_expert, batch_memory, batch_features)
            # Weighted so that the sum is the mean over all tokens (LM, KL) and rows (router), as one batch gives.
            share = {"lm": n / n_predicted, "kl": n / n_predicted, "router": batch.input_ids.shape[0] / n_rows}
            scaled = {k: v * share[k] for k, v in parts.items()}
            total = self._total(scaled)
            if not torch.isfinite(total):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite loss {total.item()} (parts: { {k: v.item() for k, v in parts.items()} }); step refused"
                )
            total.backward()
            for k, v in scaled.items():
                losses[k] = losses.get(k, 0.0) + float(v.detach())
            total_loss += float(total.detach())
            tokens += int(batch.attention_mask.sum())
        params = [p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise TrainingError(f"non-finite gradient norm {grad_norm.item()}; step refused")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.router.eval()
        seconds = time.perf_counter() - start
        metrics = {f"loss_{k}": v for k, v in losses.items()}
        metrics.update(
            loss=total_loss,
            grad_norm=float(grad_norm),
            lr=optimizer.param_groups[0]["lr"],
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens / seconds if seconds > 0 else math.inf,
            expert=target_expert,
        )
        return metrics

    @torch.no_grad()
    def loss(self, examples: Sequence[TrainingExample], target_expert: int, memory: torch.Tensor | None = None,
             features: torch.Tensor | None = None) -> float:
        """The completion-only LM loss on examples through the target expert, updating nothing.

        This is what the stress controller reads and what Mirror mode guards: how well the
        model produces the texts, not how sure the router is. Computed in the steps' micro-batches,
        weighted by their completion tokens (the mean over all tokens, as one batch gives): one batch
        of a pooled update's texts would hold the (completion tokens, vocabulary) logits of all of
        them at once.
        """
        batches, predicted, parts_of, memory_of = self._micro_batches(examples, memory, features)
        total = sum(float(self._losses(batch, target_expert, batch_memory, batch_features)["lm"]) * n
                    for batch, n, batch_features, batch_memory in zip(batches, predicted, parts_of, memory_of) if n)
        return total / sum(predicted) if sum(predicted) else math.nan  # no completion token: nan, as one batch gives

    def _micro_batches(self, examples: Sequence[TrainingExample], memory: torch.Tensor | None,
                       features: torch.Tensor | None) -> MicroBatches:
        """The examples in the steps' micro-batches."""
        size = self.config.micro_batch
        starts = list(range(0, len(examples), size)) or [0]
        batches = [self.tokenize(examples[i:i + size]) for i in starts]
        parts_of = [None if features is None else features[i:i + size] for i in starts]  # (micro-batch, h) each
        rows = _memory_for(memory, len(examples))
        memory_of = [rows[i:i + size] if _per_row(rows) else rows for i in starts]  # (micro-batch, d) each, or shared
        predicted = [int((b.labels[:, 1:] != IGNORE_INDEX).sum()) for b in batches]
        return MicroBatches(batches, predicted, parts_of, memory_of)

    def update(
        self,
        examples: Sequence[TrainingExample],
        target_expert: int,
        memory: torch.Tensor | None = None,
        guard: Sequence[TrainingExample] | None = None,
        steps: int | None = None,
        replay: Mapping[int, Sequence[TrainingExample]] | None = None,
        replay_memory: Mapping[int, torch.Tensor] | None = None,
    ) -> UpdateResult:
        """A burst of steps under the stress controller.

        The loss before training feeds the controller, whose mode picks the learning rate
        and the expert (the shared one in Single mode). The steps train on the examples
        plus ``replay[expert]``, earlier texts of the expert that trains (known only once the
        mode is decided), against forgetting. In Mirror mode the bank is snapshotted first and
        restored if the loss on ``guard`` (default: the examples and the replay) ends worse than
        before by more than the tolerance. Losses before and after are on the examples.

        ``memory``: the router's memory features, one vector (memory_dim,) for every row, or one
        row per example (len(examples), memory_dim) when the examples come from several problems
        (a pooled update); rows beyond the examples (replayed, a guard) take the first example's,
        except replayed texts given their own rows in ``replay_memory[expert]`` (len(replay[expert]),
        memory_dim): the features of the problems they were learned from.
        """
        steps = steps or self.config.steps_per_update
        for k, rows in (replay_memory or {}).items():  # before anything changes
            if rows.shape[0] != len((replay or {}).get(k, ())):
                raise ValueError(f"replay_memory has {rows.shape[0]} rows for {len((replay or {}).get(k, ()))} "
                                 f"replayed texts of expert {k}")
        features = self.prompt_features(examples)
        loss_before = self.loss(examples, target_expert, memory, features)
        self.stress.observe(loss_before)
        decision = self.stress.decide()
        expert = self.bank.config.shared_expert if decision.mode is StressMode.SINGLE else target_expert
        replayed = list((replay or {}).get(expert, ()))
        trained = list(examples) + replayed
        trained_features = torch.cat([features, self.prompt_features(replayed)]) if replayed else features
        snapshot = BankSnapshot.capture(self.bank, self.router, self.stress) if decision.snapshot else None
        # Mirror mode guards the replayed texts too (forgetting them is what replay is against).
        guard_texts, guard_features = (guard, self.prompt_features(guard)) if guard else (trained, trained_features)
        separate_guard = bool(guard) or (bool(replayed) and decision.snapshot)
        trained_memory = _with_replay_rows(memory, len(examples), (replay_memory or {}).get(expert), len(trained))
        # A caller's guard texts are not the examples: every row of it takes the first example's features.
        guard_memory = _memory_for(memory[:1] if _per_row(memory) else memory, len(guard)) if guard else trained_memory
        guard_before = self.loss(guard_texts, expert, guard_memory, guard_features) if separate_guard else loss_before
        with self.parameters_for(expert) as params:
            optimizer = self.new_optimizer(decision.lr, params)
            history = [self.step(trained, expert, optimizer, trained_memory, trained_features) for _ in range(steps)]
        loss_after = self.loss(examples, expert, memory, features)
        guard_after = self.loss(guard_texts, expert, guard_memory, guard_features) if separate_guard else loss_after
        stress_rolled_back = False
        if snapshot is not None and guard_after > guard_before + self.stress.config.rollback_tolerance:
            # Captured after observe(), so the stress reading of this update stands.
            snapshot.restore(self.bank, self.router, self.stress)
            stress_rolled_back = True
            loss_after = self.loss(examples, expert, memory, features)
            log.info("mirror rollback: guard loss %.4f -> %.4f", guard_before, guard_after)
        return UpdateResult(
            mode=decision.mode.value,
            phi=decision.phi,
            lr=decision.lr,
            expert=expert,
            loss_before=loss_before,
            loss_after=loss_after,
            guard_before=guard_before,
            guard_after=guard_after,
            stress_rolled_back=stress_rolled_back,
            steps=history,
            replayed=len(replayed),
        )


def _per_row(memory: torch.Tensor | None) -> bool:
    return memory is not None and memory.dim() == 2


def _with_replay_rows(memory: torch.Tensor | None, examples: int, replay_rows: torch.Tensor | None,
                      rows: int) -> torch.Tensor | None:
    """The memory features of the examples followed by the replayed texts' own rows, when given
    (``update`` checked that they are one per replayed text)."""
    if memory is None or replay_rows is None:
        return _memory_for(memory, rows)
    own = _memory_for(memory, examples) if _per_row(memory) else memory.expand(examples, -1)
    return torch.cat([own, replay_rows.to(own)])  # (rows, memory_dim)


def _memory_for(memory: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """The memory features of ``rows`` training rows: a shared vector (or None) as it is; per-example
    rows (n, memory_dim) as (rows, memory_dim), the first example's again for rows beyond them."""
    if not _per_row(memory):
        return memory
    if memory.shape[0] >= rows:
        return memory[:rows]
    return torch.cat([memory, memory[:1].expand(rows - memory.shape[0], -1)])
