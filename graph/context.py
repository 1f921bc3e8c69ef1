"""Run dependencies of the loop, reached by nodes through LangGraph's runtime context.

Nothing here is stored in the graph state: the model, bank, trainer and stores live for
one process and are rebuilt (and the bank reloaded from disk) when a run resumes.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from typing import Literal, Sequence

import numpy as np
import torch

from adapters.bank import ExpertBank
from adapters.router import Router, context_features
from adapters.store import BankStore
from adapters.trainer import TestTimeTrainer
from agents.diversifier import Diversifier
from agents.lm.backend import GenerationBackend, close_backend
from agents.reflector import Reflector
from agents.solver import Solver
from agents.trajectories import SOURCES, chosen_sources
from agents.verifier import VerifierConfig
from graph.canary import check_canary_settings
from memory_store.store import MemoryStore


@dataclass
class LoopConfig:
    cycles: int = 2  # reflect -> update -> re-evaluate rounds per failed problem
    label_free: bool = False  # verify by agreement of sampled answers instead of the label
    rules_in_prompt: bool = True  # put the nearest remembered rules into the solve prompt
    adapters: bool = True  # train the bank; False = rules only, no gradient
    canary_size: int = 4  # problems solved earlier that every update must not break
    canary_margin: float = 0.0  # allowed drop in canary accuracy before an update is rolled back
    # How a broken canary is judged (graph/canary.py): "margin" (accuracy may drop by canary_margin)
    # or "binomial" (undone only when the breaks are unlikely, p < canary_alpha, given how firmly
    # each canary problem's samples were right at its first try).
    canary_test: Literal["margin", "binomial"] = "margin"
    canary_alpha: float = 0.05
    # how the update picks its expert: "router" (argmax if confident, else a fresh slot) or "fresh"
    expert_policy: Literal["router", "fresh"] = "router"
    router_confidence: float = 0.5  # router probability needed to reuse its argmax expert
    seed: int = 0  # seeds sampling; the same seed and data give the same run
    # A problem answered right (greedy) is still learned from when fewer of its samples verify
    # than this: RFT's gain comes from problems the model solves only sometimes.
    low_share: float = 0.5
    rationalize: bool = True  # STaR's rationalization when no rule validates (learning split, labels only)
    replay: int = 4  # earlier verified texts of the trained expert replayed with each update, against forgetting
    replay_keep: int = 32  # verified texts kept per expert for replay
    keep_unfixed_updates: bool = True  # out of cycles and unfixed: keep updates that passed the canary gate
    validate_min_gain: int = 1  # a rule is validated when this many more of its k samples verify than without it
    # Which verified texts reach the gradient (agents.trajectories.SOURCES), e.g. for a per-source
    # ablation; a source left out is not produced at all where producing it costs a call.
    train_sources: tuple[str, ...] = SOURCES
    # The round gate: a round's updates run one after another, then their re-evaluations (each
    # problem and one canary set shared by the round) go to the backend as one call, and a broken
    # canary undoes the round's updates together (graph/episodes.py). Off: each update is
    # re-evaluated and gated alone, a narrow call per episode.
    round_gate: bool = True
    # Under the round gate: one update per phase of a round, on the verified texts of every episode
    # waiting to train, instead of one update per episode (graph/episodes.py). Fewer, broader steps:
    # rejection-sampling fine-tuning trains once on what a batch of problems yielded (Yuan et al.
    # 2023, arXiv 2308.01825), where one update per problem drove each problem's few texts to a
    # memorised loss.
    pool_updates: bool = False

    def __post_init__(self) -> None:
        if self.cycles < 1:
            raise ValueError(f"cycles must be >= 1, got {self.cycles}")
        check_canary_settings(self.canary_size, self.canary_margin, self.canary_test, self.canary_alpha)
        if self.expert_policy not in ("router", "fresh"):
            raise ValueError(f"expert_policy must be 'router' or 'fresh', got {self.expert_policy!r}")
        if not 0 < self.router_confidence <= 1:
            raise ValueError(f"router_confidence must be in (0, 1], got {self.router_confidence}")
        if not 0 <= self.low_share <= 1:
            raise ValueError(f"low_share must be in [0, 1], got {self.low_share}")
        if self.validate_min_gain < 1:
            raise ValueError(f"validate_min_gain must be >= 1, got {self.validate_min_gain}")
        self.train_sources = chosen_sources(self.train_sources)
        if self.round_gate and not self.keep_unfixed_updates:
            raise ValueError("round_gate needs keep_unfixed_updates: the gate undoes a round's updates together, "
                             "never one episode's alone")
        if self.pool_updates and not self.round_gate:
            raise ValueError("pool_updates (--pool-updates) needs round_gate (--round-gate): a pooled update trains on "
                             "the texts of a round's episodes, which only the round gate lets wait for each other")
        if self.replay < 0 or self.replay_keep < self.replay:
            raise ValueError(f"need 0 <= replay <= replay_keep, got {self.replay} and {self.replay_keep}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunContext:
    config: LoopConfig
    backend: GenerationBackend
    solver: Solver
    reflector: Reflector
    diversifier: Diversifier
    verifier: VerifierConfig
    model: object  # the frozen model, for router features
    tokenizer: object
    bank: ExpertBank
    router: Router
    trainer: TestTimeTrainer
    bank_store: BankStore
    memory: MemoryStore | None = None
    # The round gate's verdict per phase of a round, keyed by the snapshot it undoes to: the first
    # episode of the phase to re-evaluate decides (and rolls back), the others record the same
    # verdict. graph/episodes.py empties it before each phase; copies of the context share it.
    round_verdicts: dict[str, bool] = field(default_factory=dict)

    def with_backend(self, backend: GenerationBackend) -> RunContext:
        """The same run context with every agent generating through ``backend``."""
        return replace(self, backend=backend, solver=Solver(backend, self.solver.config),
                       reflector=Reflector(backend, self.reflector.config),
                       diversifier=Diversifier(backend, self.diversifier.config))

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the backend and close the memory (flushing it); closing twice is harmless."""
        close_backend(self.backend)
        if self.memory is not None:
            self.memory.close()

    def __enter__(self) -> RunContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ routing

    def memory_vectors(self, questions: list[str], exclude: Sequence[str | None] | None = None
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[list[str]], list[list[str]]]:
        """Memory features, priors, rule texts and rule ids for each question (None without memory).

        ``exclude``: per question, a problem id whose memories it must not see (its own problem).
        """
        excluded = list(exclude) if exclude is not None else [None] * len(questions)
        if len(excluded) != len(questions):
            raise ValueError(f"exclude names {len(excluded)} problems for {len(questions)} questions")
        if self.memory is None or self.router.config.memory_dim == 0:
            empty = [[] for _ in questions]
            return None, None, empty, empty
        feats = [self.memory.memory_features(q, exclude_problem=x) for q, x in zip(questions, excluded)]
        vectors = torch.from_numpy(np.stack([f.vector for f in feats]))  # (batch, feature_dim)
        priors = torch.from_numpy(np.stack([f.prior for f in feats]))  # (batch, n_experts)
        return vectors, priors, [f.rules for f in feats], [f.rule_ids for f in feats]

    @torch.no_grad()
    def routing(self, prompts: list[str], memory: torch.Tensor | None, prior: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router probabilities (dense) and mixture weights (per the router mode), (batch, n_experts) each."""
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        device = next(self.model.parameters()).device
        feats = context_features(self.model, self.bank, enc["input_ids"].to(device), enc["attention_mask"].to(device))
        logits = self.router(feats, None if memory is None else memory.to(feats.device))
        probs = self.router.weights(logits, mode="dense", prior=prior)
        weights = self.router.weights(logits, prior=prior) if self.router.config.mode != "forced" else probs
        return probs, weights

    def pick_expert(self, problem_id: str, probs: torch.Tensor, usage: list[int]) -> tuple[int, str]:
        """The expert an update trains, and why: stable for the same inputs (hashlib, not hash())."""
        shared = self.bank.config.shared_expert
        n = self.bank.n_experts
        if self.config.expert_policy == "router":
            best = int(probs.argmax())
            if float(probs[best]) >= self.config.router_confidence and best != shared:
                return best, "router"
        candidates = [e for e in range(n) if e != shared and usage[e] == 0] or [e for e in range(n) if e != shared]
        if not candidates:  # a one-expert bank
            return shared, "shared"
        if all(usage[e] > 0 for e in candidates):  # no fresh slot left: the least used one
            least = min(usage[e] for e in candidates)
            candidates = [e for e in candidates if usage[e] == least]
            reason = "least_used"
        else:
            reason = "fresh"
        digest = int(hashlib.sha256(problem_id.encode()).hexdigest(), 16)
        return candidates[digest % len(candidates)], reason
