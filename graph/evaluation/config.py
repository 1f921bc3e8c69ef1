"""What an evaluation is: its protocol, arms and settings, saved in eval.json and checked on resume.

Protocols (every output names the one it comes from):
  holdout   the loop learns on a stream of learning problems; evaluation problems, disjoint
            from them by id and by normalised text, are scored by the frozen model (the score
            before learning) and by every arm after learning.
  stream    each problem of the evaluation data is scored once, before the loop learns from
            it, and never re-scored: online accuracy.
  recovery  the loop learns on the evaluation problems (with their reference solutions), then
            the problems the frozen model failed are scored again. This measures plasticity,
            whether the loop can fix what it was shown, not generalisation.

Arms, on identical problems and generation settings (greedy), sharing the base model and seed:
  frozen       the base model: no rules, no adapters
  vote         the frozen model's majority answer over as many samples as the loop draws per problem
  rules        rules retrieved from the arm's memory in the prompt, bare model (no gradient)
  adapters     the loop's expert bank under the router's weights, no rules in the prompt
  full         both
  single-lora  one plain LoRA (a one-expert bank, forced routing, no router) trained with the
               same trainer on every training text the adapters arm produced, burst by burst
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from adapters.bank import BankConfig
from adapters.router import RouterConfig
from adapters.stress import StressConfig
from adapters.trainer import TrainerConfig
from agents.errors import SelfImproveError
from agents.lm.backend import BACKENDS, DEFAULT_BATCH_SIZE
from agents.lm.models import DEFAULT_MODEL
from agents.lm.precision import PRECISIONS, check_precision_for_backend
from agents.solver import SolverConfig
from agents.trajectories import SOURCES, chosen_sources
from agents.verifier import VerifierConfig
from graph.canary import check_canary_settings
from graph.context import LoopConfig
from graph.run_dir import DEFAULT_ROUND_SIZE, RunSettings
from graph.saved_settings import read_saved, settings_with_options
from memory_store.embedding import EMBEDDERS

PROTOCOLS = ("holdout", "stream", "recovery")
ARMS = ("frozen", "vote", "rules", "adapters", "full", "single-lora")
LOOP_ARMS = ("rules", "adapters", "full")  # the arms that run the loop


EVAL_FILE = "eval.json"

PROTOCOL_NOTES = {
    "holdout": "learned on the learning problems only; evaluation problems (disjoint by id and text) "
               "scored after learning; the frozen arm is the score before learning",
    "stream": "online accuracy: each problem scored once, before the loop learned from it, never re-scored",
    "recovery": "re-scored the problems the frozen model failed after the loop learned from them "
                "(with their reference solutions): plasticity, not generalisation",
}


class EvalInterrupted(SelfImproveError):
    """The evaluation was stopped (Ctrl-C) after a finished node; it resumes from the arms' checkpoints."""


@dataclass
class EvalConfig:
    model: str = DEFAULT_MODEL  # model spec: an alias, a folder, a .gguf file or a hub id
    protocol: Literal["holdout", "stream", "recovery"] = "holdout"
    arms: tuple[str, ...] = ARMS  # compared arms; 'frozen' is always added (every arm is compared with it)
    learn_data: str = "train"  # holdout learning problems: 'train', 'test', 'gsm8k:train', or a JSON-lines path
    eval_data: str = "test"  # scored problems (and, in stream and recovery, the learning stream too)
    learn_problems: int = 20  # learning problems drawn from learn_data (holdout only)
    eval_problems: int = 50  # problems drawn from eval_data
    seed: int = 0  # draws the subsets and seeds the loop, bank and router of every arm
    cycles: int = 2  # reflect/update rounds per failed learning problem
    label_free: bool = False  # learn by agreement of sampled answers (scoring always uses labels)
    max_new_tokens: int = 384  # generation cap per answer, the same for every arm
    batch_size: int = DEFAULT_BATCH_SIZE  # sequences generated together (torch and llama.cpp slots)
    backend: str = "auto"  # generation backend of every arm: 'auto', 'torch' or 'llama.cpp' (agents.lm.backend)
    embedder: str = "minilm"  # memory embedder: 'minilm' (all-MiniLM-L6-v2) or 'hash' (tests)
    precision: str = "auto"  # frozen weights of every arm: 'auto' (agents.lm.precision), 'float32', 'bfloat16', 'int8'
    bank: BankConfig = field(default_factory=BankConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stress: StressConfig = field(default_factory=StressConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    canary_size: int = 4  # solved learning problems every update must not break
    canary_margin: float = 0.0  # allowed drop in canary accuracy before an update is rolled back
    canary_test: Literal["margin", "binomial"] = "margin"  # how a broken canary is judged: 'margin' or 'binomial' (graph/canary.py)
    canary_alpha: float = 0.05  # the binomial test's level: breaks less likely than this undo the update
    round_size: int = DEFAULT_ROUND_SIZE  # learning episodes that sample together (graph/episodes.run_episodes)
    train_sources: tuple[str, ...] = SOURCES  # verified texts that reach the gradient (a per-source ablation)
    round_gate: bool = True  # a round's updates re-evaluated and gated together (graph.context.LoopConfig.round_gate)
    pool_updates: bool = False  # one update per round phase on all its texts (graph.context.LoopConfig.pool_updates)
    plots: bool = True  # write the PNG plots with the report

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {self.protocol!r}")
        arms = tuple(self.arms)
        unknown = [a for a in arms if a not in ARMS]
        if unknown or not arms:
            raise ValueError(f"arms must be a non-empty subset of {', '.join(ARMS)}; got {', '.join(arms) or 'none'}")
        if "single-lora" in arms and "adapters" not in arms:
            raise ValueError("the single-lora arm trains on the adapters arm's texts: add the adapters arm")
        self.arms = tuple(a for a in ARMS if a in arms or a == "frozen")  # canonical order, frozen first
        for name in ("learn_problems", "eval_problems", "cycles", "max_new_tokens", "batch_size", "round_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        check_precision_for_backend(self.precision, self.backend)
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}; got {self.embedder!r}")
        check_canary_settings(self.canary_size, self.canary_margin, self.canary_test, self.canary_alpha)
        self.train_sources = chosen_sources(self.train_sources)
        if self.pool_updates and not self.round_gate:
            raise ValueError("--pool-updates needs the round gate (--round-gate): a pooled update trains on the "
                             "texts of a round's episodes, which only the gate lets wait for each other")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))




# Settings added after evaluations were first saved, with the values those evaluations ran with.
LEGACY_CONFIG = {"backend": "torch", "precision": "float32", "round_size": 1, "round_gate": False,
                 "canary_test": "margin", "pool_updates": False}
# Settings a resumed evaluation may change. The round size, the gate, pooled updates and the canary's settings change
# only learning arms not yet started: a started one keeps its own, saved in its run folder and
# checked there (frozen and vote never learn, so none of them changes their answers).
CANARY_SETTINGS = ("canary_size", "canary_margin", "canary_test", "canary_alpha")
RESUMABLE_EVAL_CHANGES = ("plots", "round_size", "round_gate", "pool_updates", *CANARY_SETTINGS)
# The command-line option of each setting, for messages about them.
EVAL_FLAGS = {
    "model": "--model", "protocol": "--protocol", "arms": "--arms", "learn_data": "--learn-data",
    "eval_data": "--eval-data", "learn_problems": "--learn-problems", "eval_problems": "--eval-problems",
    "seed": "--seed", "cycles": "--cycles", "label_free": "--label-free", "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size", "backend": "--backend", "embedder": "--embedder", "bank.n_experts": "--experts",
    "trainer.steps_per_update": "--steps", "plots": "--plots", "precision": "--precision",
    "verifier.samples": "--samples", "round_size": "--round-size", "canary_size": "--canary-size",
    "canary_margin": "--canary-margin", "stress.loss_scale": "--stress-scale", "train_sources": "--train-sources",
    "round_gate": "--round-gate", "canary_test": "--canary-test", "canary_alpha": "--canary-alpha",
    "pool_updates": "--pool-updates",
}


def eval_config(run_dir: str | Path, resume: bool, options: dict) -> EvalConfig:
    """The config of an evaluation: the one saved in run_dir on resume (options given again must agree), else the options."""
    path = Path(run_dir) / EVAL_FILE
    saved = read_saved(path) if resume else None
    if saved is not None:
        saved = {**LEGACY_CONFIG, **saved.get("config", {})}
    return settings_with_options(EvalConfig, saved, options, flags=EVAL_FLAGS, changeable=RESUMABLE_EVAL_CHANGES, where=path)


def arm_settings(config: EvalConfig, arm: str, episodes: int) -> RunSettings:
    """The loop settings of a learning arm: the shared ones, with the arm's switches."""
    switches = {"rules": {"adapters": False}, "adapters": {"rules_in_prompt": False}, "full": {}}[arm]
    return RunSettings(
        model=config.model,
        data=config.eval_data if config.protocol != "holdout" else config.learn_data,
        episodes=episodes,
        loop=LoopConfig(cycles=config.cycles, label_free=config.label_free, seed=config.seed,
                        canary_size=config.canary_size, canary_margin=config.canary_margin,
                        canary_test=config.canary_test, canary_alpha=config.canary_alpha,
                        train_sources=config.train_sources, round_gate=config.round_gate,
                        pool_updates=config.pool_updates, **switches),
        bank=replace(config.bank, seed=config.seed),
        router=replace(config.router, seed=config.seed),
        trainer=config.trainer,
        stress=config.stress,
        solver=SolverConfig(max_new_tokens=config.max_new_tokens),
        verifier=config.verifier,
        backend=config.backend,
        batch_size=config.batch_size,
        embedder=config.embedder,
        precision=config.precision,
        round_size=config.round_size,
    )
