"""The GSM8K evaluation harness: protocols, arms, scoring, and the numbers the report shows.

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
  rules        rules retrieved from the arm's memory in the prompt, bare model (no gradient)
  adapters     the loop's expert bank under the router's weights, no rules in the prompt
  full         both
  single-lora  one plain LoRA (a one-expert bank, forced routing, no router) trained with the
               same trainer on every training text the adapters arm produced, burst by burst

Each learning arm learns in its own folder ``run_dir/arms/<arm>`` (its own bank, memory and
checkpoints, a valid run directory for ``rules`` and ``export``); a killed evaluation resumes
from those checkpoints. Evaluation problems never enter ``run_episodes`` in ``holdout``: they
are only scored, so they cannot reach reflect, diversify or update.

Python use::

    from graph.harness import EvalConfig, evaluate
    report = evaluate(EvalConfig(model="qwen2.5-coder-0.5b", learn_problems=20, eval_problems=50), "runs/eval")
    report.summary()["arms"]["full"]["accuracy"]
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from adapters.bank import BankConfig, ExpertBank
from adapters.router import RouterConfig
from adapters.stack import build_adapters
from adapters.stress import StressConfig
from adapters.trainer import TrainerConfig, TrainingExample
from agents.data_sources import DataSource, open_source
from agents.diversifier import Diversifier
from agents.errors import DataError, SelfImproveError
from agents.files import atomic_write_bytes
from agents.gsm8k import Problem, normalise_question, sample_problems
from agents.lm.backend import BACKENDS, DEFAULT_BATCH_SIZE, GenerationBackend, close_backend, make_backend
from agents.lm.generation import Sampling
from agents.lm.models import DEFAULT_MODEL, LoadedModel, load_model, pick_device
from agents.lm.precision import PRECISIONS, PrecisionChoice, choose_precision
from agents.reflector import Reflector
from agents.solver import Attempt, Solver, SolverConfig
from agents.trajectories import SOURCES
from agents.verifier import VerifierConfig, check, vote
from graph.context import LoopConfig, RunContext
from graph.inspection import EMBEDDERS, make_embedder
from graph.nodes import update_survived
from graph.routing import route
from graph.runner import (
    RunDirError,
    RunSettings,
    StopFlag,
    build_context,
    check_questions_fit,
    describe_episode,
    prepare_run_dir,
    problem_data,
    run_episodes,
)
from graph.saved_settings import leaf_differences, read_saved, settings_with_options
from graph.stats import PairedComparison, compare, wilson_interval

log = logging.getLogger(__name__)

PROTOCOLS = ("holdout", "stream", "recovery")
ARMS = ("frozen", "vote", "rules", "adapters", "full", "single-lora")
SCORE_CALL_BATCHES = 4  # batches' worth of problems per scoring call (see _Run._solve)
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
    precision: str = "auto"  # frozen weights of every arm: 'auto' (agents.lm.precision), 'float32', 'bfloat16'
    bank: BankConfig = field(default_factory=BankConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    stress: StressConfig = field(default_factory=StressConfig)
    verifier: VerifierConfig = field(default_factory=VerifierConfig)
    canary_size: int = 4  # solved learning problems every update must not break
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
        for name in ("learn_problems", "eval_problems", "cycles", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.embedder not in EMBEDDERS:
            raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}; got {self.embedder!r}")
        if self.canary_size < 0:
            raise ValueError(f"canary_size must be >= 0, got {self.canary_size}")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=str))


# ---------------------------------------------------------------- problems


@dataclass
class ProblemSets:
    learn: list[Problem]  # what the loop learns from, in order
    scored: list[Problem]  # what the arms are scored on (recovery: the pool the failed ones come from)
    sources: dict = field(default_factory=dict)  # 'learn' / 'eval': DataSource.to_dict() of where they came from

    def to_dict(self) -> dict:
        return {"learn_ids": [p.id for p in self.learn], "scored_ids": [p.id for p in self.scored]}


def check_disjoint(learn: Sequence[Problem], scored: Sequence[Problem]) -> None:
    """DataError if a learning problem is also an evaluation problem, by id or by normalised text."""
    ids = {p.id for p in learn} & {p.id for p in scored}
    texts = {normalise_question(p.question) for p in learn} & {normalise_question(p.question) for p in scored}
    if ids or texts:
        example = sorted(ids)[0] if ids else next(p.id for p in scored if normalise_question(p.question) in texts)
        raise DataError(f"learning and evaluation problems overlap ({len(ids)} by id, {len(texts)} by text, "
                        f"e.g. {example}); holdout needs disjoint data")


def prepare_problems(config: EvalConfig, on_source: Callable[[DataSource], None] | None = None) -> ProblemSets:
    """The learning and scored problems of a protocol, drawn by seed; holdout sets are checked disjoint.

    ``on_source`` is told each data source as it is resolved (the CLI prints them).
    """
    notify = on_source or (lambda _source: None)
    eval_source = open_source(config.eval_data)
    notify(eval_source)
    pool = eval_source.problems
    scored = sample_problems(pool, config.eval_problems, config.seed, source=_named(eval_source))
    missing = [p.id for p in scored if p.label is None]
    if missing:
        raise DataError(f"evaluation problems need labels ('answer' ending in '#### N'); {missing[0]} has none")
    sources = {"eval": eval_source.to_dict()}
    if config.protocol != "holdout":
        learn = scored  # stream and recovery learn on the scored problems themselves
        sources["learn"] = eval_source.to_dict()
    else:
        learn_source = eval_source if config.learn_data == config.eval_data else open_source(config.learn_data)
        if learn_source is not eval_source:
            notify(learn_source)
        if learn_source.key == eval_source.key:
            # One source for both: learning problems come from what the evaluation draw left.
            taken_ids = {p.id for p in scored}
            taken_texts = {normalise_question(p.question) for p in scored}
            rest = [p for p in pool if p.id not in taken_ids and normalise_question(p.question) not in taken_texts]
            where = f"{_named(learn_source)} after the {len(scored)} evaluation problems drawn from it"
        else:
            rest, where = learn_source.problems, _named(learn_source)
        learn = sample_problems(rest, config.learn_problems, config.seed, source=where)
        check_disjoint(learn, scored)
        sources["learn"] = learn_source.to_dict()
    if not config.label_free:
        unlabelled = [p.id for p in learn if p.label is None]
        if unlabelled:
            raise DataError(f"learning problem {unlabelled[0]} has no label; pass label_free=True (--label-free)")
    return ProblemSets(learn, scored, sources)


def _named(source: DataSource) -> str:
    return f"{source.spec} ({source.kind} {source.location})"


# ---------------------------------------------------------------- results


@dataclass
class ItemScore:
    id: str
    correct: bool
    answer: str | None  # the extracted final number; None = no number found (a format failure)
    strategy: str  # how the answer was extracted
    tokens: int


@dataclass
class ArmResult:
    arm: str
    scores: list[ItemScore]  # in the report's item order
    seconds: dict  # learn, score
    learning: dict = field(default_factory=dict)  # what the arm's learning did
    curve: list[dict] = field(default_factory=list)  # per learning episode: first-try verdict, outcome, phi
    expert_usage: dict | None = None  # mean routing weight per expert when scored; updates per expert
    backend: str = ""  # the generation backend's description (what generated, and how)

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def correct(self) -> int:
        return sum(s.correct for s in self.scores)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def format_failures(self) -> int:
        """Answers with no number in them at all: counted apart from wrong answers."""
        return sum(s.answer is None for s in self.scores)

    @property
    def wrong(self) -> int:
        return sum(not s.correct and s.answer is not None for s in self.scores)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.scores)

    def summary(self) -> dict:
        low, high = wilson_interval(self.correct, self.n)
        return {
            "n": self.n, "correct": self.correct, "accuracy": self.accuracy, "ci95": [low, high],
            "wrong": self.wrong, "format_failures": self.format_failures,
            "last_number_fallbacks": sum(s.strategy == "last_number" for s in self.scores),
            "tokens": self.tokens, "seconds": self.seconds, "backend": self.backend,
        }


@dataclass
class EvalReport:
    protocol: str
    protocol_note: str
    config: dict
    items: list[dict]  # the scored problems: id, question, label
    learn_ids: list[str]
    arms: dict[str, ArmResult]
    comparisons: dict[str, PairedComparison]  # every arm but frozen against frozen
    leak_check: dict  # training texts that contain an evaluation question (holdout must be 0)
    run_dir: str
    seconds: float
    extra: dict = field(default_factory=dict)  # protocol-specific facts (recovery: the pool it came from)
    data_sources: dict = field(default_factory=dict)  # 'eval' / 'learn': where the problems came from
    files: dict = field(default_factory=dict)  # report files written, by kind

    def summary(self) -> dict:
        """The short, script-friendly view: per arm accuracy, interval and comparison with frozen."""
        arms = {}
        for name, result in self.arms.items():
            arms[name] = result.summary()
            if name in self.comparisons:
                arms[name]["vs_frozen"] = self.comparisons[name].to_dict()
            if name in self.extra.get("vs_vote", {}):
                arms[name]["vs_vote"] = self.extra["vs_vote"][name]
        return {
            "protocol": self.protocol, "protocol_note": self.protocol_note, "model": self.config["model"],
            "n_scored": len(self.items), "n_learn": len(self.learn_ids), "arms": arms,
            "leak_check": self.leak_check, "data_sources": self.data_sources, **self.extra, "run_dir": self.run_dir, "files": self.files,
        }

    def to_dict(self) -> dict:
        out = self.summary()
        out.update(
            config=self.config, items=self.items, learn_ids=self.learn_ids, seconds=self.seconds,
            per_item={name: [asdict(s) for s in r.scores] for name, r in self.arms.items()},
            learning={name: r.learning for name, r in self.arms.items() if r.learning},
            curves={name: r.curve for name, r in self.arms.items() if r.curve},
            expert_usage={name: r.expert_usage for name, r in self.arms.items() if r.expert_usage},
        )
        return out


@dataclass
class EvalProgress:
    arm: str
    phase: str  # learn | score | train
    done: int
    total: int
    detail: str = ""  # while learning: the episode and the loop node that just finished
    finished: str = ""  # a line on what just ended (a learning episode, a scoring pass), for a log


# ---------------------------------------------------------------- the run


# Settings added after evaluations were first saved, with the values those evaluations ran with.
LEGACY_CONFIG = {"backend": "torch", "precision": "float32"}
# The command-line option of each setting, for messages about them.
EVAL_FLAGS = {
    "model": "--model", "protocol": "--protocol", "arms": "--arms", "learn_data": "--learn-data",
    "eval_data": "--eval-data", "learn_problems": "--learn-problems", "eval_problems": "--eval-problems",
    "seed": "--seed", "cycles": "--cycles", "label_free": "--label-free", "max_new_tokens": "--max-new-tokens",
    "batch_size": "--batch-size", "backend": "--backend", "embedder": "--embedder", "bank.n_experts": "--experts",
    "trainer.steps_per_update": "--steps", "plots": "--plots", "precision": "--precision",
    "verifier.samples": "--samples",
}


def eval_config(run_dir: str | Path, resume: bool, options: dict) -> EvalConfig:
    """The config of an evaluation: the one saved in run_dir on resume (options given again must agree), else the options."""
    path = Path(run_dir) / EVAL_FILE
    saved = read_saved(path) if resume else None
    if saved is not None:
        saved = {**LEGACY_CONFIG, **saved.get("config", {})}
    return settings_with_options(EvalConfig, saved, options, flags=EVAL_FLAGS, changeable=("plots",), where=path)


def _prepare_eval_dir(run_dir: Path, config: EvalConfig, sets: ProblemSets, resume: bool) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / EVAL_FILE
    wanted = {"config": {k: v for k, v in config.to_dict().items() if k != "plots"}, **sets.to_dict()}
    if path.exists():
        if not resume:
            raise RunDirError(f"{run_dir} already holds an evaluation; pass --resume to continue it or choose another --run-dir")
        saved = read_saved(path)
        saved["config"] = {**LEGACY_CONFIG, **saved.get("config", {})}
        saved.pop("data_sources", None)  # a note of where the problems came from, not a setting
        if saved != wanted:
            differs = leaf_differences(saved.get("config", {}), wanted["config"])
            shown = "; ".join(f"{key}: saved {a!r}, now {b!r}" for key, a, b in differs) or "problem ids"
            raise RunDirError(f"{run_dir} holds an evaluation with different settings or problems ({shown}); "
                              "use another --run-dir")
    atomic_write_bytes(path, json.dumps({**wanted, "data_sources": sets.sources}, indent=2).encode())


def arm_settings(config: EvalConfig, arm: str, episodes: int) -> RunSettings:
    """The loop settings of a learning arm: the shared ones, with the arm's switches."""
    switches = {"rules": {"adapters": False}, "adapters": {"rules_in_prompt": False}, "full": {}}[arm]
    return RunSettings(
        model=config.model,
        data=config.eval_data if config.protocol != "holdout" else config.learn_data,
        episodes=episodes,
        loop=LoopConfig(cycles=config.cycles, label_free=config.label_free, seed=config.seed,
                        canary_size=config.canary_size, **switches),
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
    )


def _with_backend(ctx: RunContext, backend: GenerationBackend) -> RunContext:
    """The same run context with every agent generating through ``backend`` (built after the bank)."""
    return replace(ctx, backend=backend, solver=Solver(backend, ctx.solver.config),
                   reflector=Reflector(backend, ctx.reflector.config),
                   diversifier=Diversifier(backend, ctx.diversifier.config))


def _score(problem: Problem, attempt: Attempt) -> ItemScore:
    return ItemScore(problem.id, check(attempt, problem.label).correct, attempt.answer, attempt.strategy, attempt.tokens)


def _vote_score(problem: Problem, samples: Sequence[Attempt], verifier: VerifierConfig) -> ItemScore:
    """The majority answer of exactly these samples, scored against the label (ties: the first answer seen)."""
    majority = vote(samples, verifier)  # its answer is the plurality, whatever the agreement threshold
    correct = majority.answer is not None and check(Attempt("", majority.answer, "vote", 0), problem.label).correct
    return ItemScore(problem.id, bool(correct), majority.answer, "vote", sum(a.tokens for a in samples))


def _chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class _Run:
    """One evaluate() call: the config, its dependencies and the progress hook."""

    def __init__(self, config, run_dir, loader, backend, on_progress, stop, embedder, precision: PrecisionChoice,
                 sets: ProblemSets):
        self.config, self.run_dir, self.sets = config, run_dir, sets
        self._load = loader or (lambda: load_model(config.model, dtype=precision.used))
        self._fit_checked = False
        self.backend = backend
        self.on_progress = on_progress or (lambda _p: None)
        self.stop = stop
        self.embedder = embedder
        self.solver_config = SolverConfig(max_new_tokens=config.max_new_tokens)

    def loader(self) -> LoadedModel:
        """A fresh model for an arm; the first one also checks that every question fits its context."""
        loaded = self._load()
        if not self._fit_checked:
            problems = list({p.id: p for p in [*self.sets.learn, *self.sets.scored]}.values())
            check_questions_fit(problems, loaded, self.config.max_new_tokens, where="the evaluation's data")
            self._fit_checked = True
        return loaded

    def progress(self, arm: str, phase: str, done: int, total: int, detail: str = "", finished: str = "") -> None:
        self.on_progress(EvalProgress(arm, phase, done, total, detail, finished))

    def _backend_for(self, loaded: LoadedModel, bank: ExpertBank | None) -> GenerationBackend:
        if self.backend is not None:
            return self.backend(loaded, bank)
        return make_backend(self.config.backend, loaded, bank, batch_size=self.config.batch_size,
                            max_new_tokens=self.config.max_new_tokens)

    def _solve(self, arm: str, solver: Solver, problems: Sequence[Problem], route,
               keep: bool = True) -> tuple[list[ItemScore], list]:
        """Score problems in calls of several batches; route(questions) gives (rules, weights) for a call.

        A call holds SCORE_CALL_BATCHES batches' worth of problems: continuous batching refills
        its slots within a call, and progress is reported after each. With ``keep``, each finished
        call is kept (``ScoredCalls``), so a killed arm resumes after its last finished call.
        """
        kept = ScoredCalls(self.run_dir if keep else None, arm)
        scores, used = [], []
        for index, chunk in enumerate(_chunks(list(problems), SCORE_CALL_BATCHES * self.config.batch_size)):
            done = kept.get(index, chunk)
            if done is None:
                start = time.perf_counter()
                rules, weights = route([p.question for p in chunk])
                attempts = solver.solve([p.question for p in chunk], rules, weights=weights)
                mixture = None if weights is None else weights.float().cpu().expand(len(chunk), -1).tolist()
                done = kept.add(index, chunk, [_score(p, a) for p, a in zip(chunk, attempts)], mixture,
                                time.perf_counter() - start)
            scores += done.scores
            if done.weights is not None:
                used.append(torch.tensor(done.weights))  # (chunk, n_experts)
            right = sum(score.correct for score in scores)
            self.progress(arm, "score", len(scores), len(problems),
                          finished=f"{arm}: scored {len(scores)}/{len(problems)}, {right} right" if len(scores) == len(problems) else "")
        self.score_seconds = kept.seconds
        return scores, used

    # -- frozen

    def frozen(self, problems: Sequence[Problem]) -> ArmResult:
        loaded = self.loader()
        backend = self._backend_for(loaded, None)
        try:
            scores, _ = self._solve("frozen", Solver(backend, self.solver_config), problems,
                                    lambda qs: ([[] for _ in qs], None))
        finally:
            close_backend(backend)
        return ArmResult("frozen", scores, {"learn": 0.0, "score": self.score_seconds}, backend=backend.description)

    # -- vote: the compute-matched baseline

    def vote(self, problems: Sequence[Problem]) -> ArmResult:
        """The frozen model's majority answer over k sampled answers, k = what the loop samples per problem."""
        cfg = self.config
        k = cfg.verifier.samples
        loaded = self.loader()
        backend = self._backend_for(loaded, None)
        solver = Solver(backend, self.solver_config)
        sampling = Sampling(temperature=cfg.verifier.temperature, seed=cfg.seed)
        kept = ScoredCalls(self.run_dir, "vote")
        scores: list[ItemScore] = []
        try:
            for index, chunk in enumerate(_chunks(list(problems), max(1, SCORE_CALL_BATCHES * cfg.batch_size // k))):
                done = kept.get(index, chunk)
                if done is None:
                    start = time.perf_counter()
                    flat = [p.question for p in chunk for _ in range(k)]
                    attempts = solver.solve(flat, [[] for _ in flat], sampling=sampling)
                    voted = [_vote_score(p, attempts[i * k:(i + 1) * k], cfg.verifier) for i, p in enumerate(chunk)]
                    done = kept.add(index, chunk, voted, None, time.perf_counter() - start)
                scores += done.scores
                self.progress("vote", "score", len(scores), len(problems),
                              finished=f"vote: scored {len(scores)}/{len(problems)}, {sum(x.correct for x in scores)} right"
                              if len(scores) == len(problems) else "")
        finally:
            close_backend(backend)
        return ArmResult("vote", scores, {"learn": 0.0, "score": kept.seconds},
                         {"samples_per_problem": k, "temperature": cfg.verifier.temperature}, backend=backend.description)

    # -- loop arms

    def loop_arm(self, arm: str, sets: ProblemSets, scored: Sequence[Problem], resume: bool) -> tuple[ArmResult, list[dict]]:
        cfg = self.config
        arm_dir = self.run_dir / "arms" / arm
        settings = arm_settings(cfg, arm, len(sets.learn))
        prepare_run_dir(arm_dir, settings, resume)
        log.info("%s arm: learning on %d problems in %s", arm, len(sets.learn), arm_dir)
        loaded = self.loader()
        ctx = build_context(loaded, settings, arm_dir, embedder=self.embedder)
        if self.backend is not None:
            ctx = _with_backend(ctx, self.backend(loaded, ctx.bank))
        try:
            stream = [problem_data(p, learning=True, label_free=cfg.label_free) for p in sets.learn]
            states: list[dict] = []
            start = time.perf_counter()
            ran: set[int] = set()  # episodes whose nodes ran in this process (not read back from a checkpoint)

            def on_event(event) -> None:
                ran.add(event.episode)
                self.progress(arm, "learn", len(states), len(stream), f"episode {event.episode + 1} {event.node}")

            episode_seconds: list[float] = []
            mark = time.perf_counter()
            for state in run_episodes(ctx, stream, run_dir=arm_dir, stop=self.stop, on_event=on_event):
                now = time.perf_counter()
                if len(states) in ran:
                    episode_seconds.append(now - mark)
                mark = now
                states.append(state)
                line = f"{arm}: learning episode {len(states)}/{len(stream)}: {describe_episode(state)}"
                self.progress(arm, "learn", len(states), len(stream), finished=line)
            if len(states) < len(stream):
                raise EvalInterrupted(f"stopped while the {arm} arm was learning (episode {len(states) + 1} of {len(stream)})")
            learn_seconds = time.perf_counter() - start
            learning = {**learning_summary(states), **_timing(episode_seconds), "backend": ctx.backend.description}
            used: list = []
            start = time.perf_counter()
            if cfg.protocol == "stream":
                # Online: the score is each episode's first attempt, made before learning on it.
                by_id = {p.id: p for p in sets.learn}
                scores = [_score(by_id[s["problem"]["id"]], Attempt(**s["first_try"]["attempt"])) for s in states]
                scored_by = ctx.backend.description
            else:
                close_backend(ctx.backend)  # learning is over: free it before the scoring backend loads
                backend = self._backend_for(loaded, ctx.bank)
                try:
                    solver = Solver(backend, ctx.solver.config)
                    scores, used = self._solve(arm, solver, scored, lambda qs: self._route(ctx, solver, arm, qs))
                finally:
                    close_backend(backend)
                scored_by = backend.description
            seconds = {"learn": learn_seconds,
                       "score": self.score_seconds if cfg.protocol != "stream" else time.perf_counter() - start}
            result = ArmResult(arm, scores, seconds, learning, learning_curve(states, sets.learn), backend=scored_by)
            if arm != "rules":
                n = ctx.bank.n_experts
                # Stream episodes keep only their latest mixture, not the first one: no mean is shown there.
                mean = torch.cat(used).mean(0).tolist() if used else None  # (n_experts,)
                updates = (states[-1]["carry"].get("expert_updates") if states else None) or [0] * n
                result.expert_usage = {"mean_weight": mean, "updates": list(updates)}
        finally:
            close_backend(ctx.backend)
            if ctx.memory is not None:
                ctx.memory.close()
        return result, states

    @staticmethod
    def _route(ctx: RunContext, solver: Solver, arm: str, questions: list[str]):
        """The arm's prompt rules and mixture weights (batch, n_experts), as the loop's solve node routes."""
        use_adapters = arm in ("adapters", "full")
        routes = route(ctx, questions, with_rules=arm in ("rules", "full"), with_adapters=use_adapters, solver=solver)
        weights = torch.cat([r.weights for r in routes]) if use_adapters else None  # None: the bare model
        return [r.rules for r in routes], weights

    # -- single LoRA

    def single_lora(self, bursts: list[list[list[TrainingExample]]], sets: ProblemSets,
                    scored: Sequence[Problem]) -> ArmResult:
        """One expert, forced routing: trained burst by burst on the adapters arm's texts."""
        cfg = self.config
        arm_dir = self.run_dir / "arms" / "single-lora"
        loaded = self.loader()
        bank_config = replace(cfg.bank, n_experts=1, shared_expert=0, seed=cfg.seed)
        router_config = replace(cfg.router, mode="forced", memory_dim=0, seed=cfg.seed)
        adapters = build_adapters(loaded.model, loaded.tokenizer, bank_config, router_config, stress=cfg.stress,
                                  trainer=cfg.trainer, bank_dir=arm_dir / "bank")
        bank, trainer = adapters.bank, adapters.trainer
        backend = self._backend_for(loaded, bank)
        solver = Solver(backend, self.solver_config)
        one = bank.one_hot(0)  # (1, 1): the single expert for every sequence
        total_bursts = sum(len(b) for b in bursts)
        log.info("single-lora arm: %d update bursts from the adapters arm", total_bursts)
        trained, train_seconds, score_seconds = 0, 0.0, 0.0
        results: list[dict] = []

        def train(episode_bursts) -> None:
            nonlocal trained, train_seconds
            for burst in episode_bursts:
                start = time.perf_counter()
                result = trainer.update(burst, target_expert=0)
                train_seconds += time.perf_counter() - start
                results.append({"mode": result.mode, "phi": result.phi, "loss_before": result.loss_before,
                                "loss_after": result.loss_after, "stress_rolled_back": result.stress_rolled_back, "texts": len(burst)})
                trained += 1
                self.progress("single-lora", "train", trained, total_bursts)

        route = lambda qs: ([[] for _ in qs], one)  # noqa: E731
        try:
            if cfg.protocol == "stream":
                # Online like the loop: score problem i with the LoRA trained on the bursts of episodes < i.
                scores = []
                for problem, episode_bursts in zip(sets.learn, bursts):
                    start = time.perf_counter()
                    scores += self._solve("single-lora", solver, [problem], route, keep=False)[0]
                    score_seconds += time.perf_counter() - start
                    train(episode_bursts)
            else:
                for episode_bursts in bursts:
                    train(episode_bursts)
                start = time.perf_counter()
                scores, _ = self._solve("single-lora", solver, scored, route, keep=False)
                score_seconds = time.perf_counter() - start
        finally:
            close_backend(backend)
        # Saved as a run directory of its own, so `export --run-dir .../single-lora --expert 0` works.
        adapters.store.save(extra={"model": cfg.model, "arm": "single-lora"})
        settings = replace(arm_settings(cfg, "adapters", len(sets.learn)), bank=bank_config, router=router_config)
        atomic_write_bytes(arm_dir / "run.json", json.dumps(settings.to_dict(), indent=2).encode())
        learning = {"bursts": len(results), "texts": sum(r["texts"] for r in results),
                    "stress_rolled_back": sum(r["stress_rolled_back"] for r in results),
                    "source": "every update burst of the adapters arm, in order, including bursts the loop later undid"}
        return ArmResult("single-lora", scores, {"learn": train_seconds, "score": score_seconds}, learning,
                         backend=backend.description)


def _timing(seconds: list[float]) -> dict:
    """Median and 90th percentile of episode wall times (nearest rank), over the episodes timed."""
    if not seconds:
        return {"episodes_timed": 0, "episode_seconds_median": None, "episode_seconds_p90": None}
    ordered = sorted(seconds)
    rank = lambda q: ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]  # noqa: E731
    return {"episodes_timed": len(ordered), "episode_seconds_median": statistics.median(ordered),
            "episode_seconds_p90": rank(0.9)}


SCORED_FILE = "scored.jsonl"  # an arm's finished scoring calls, for a resume inside scoring
RESULT_FILE = "result.json"  # a finished arm's scores (and learning states), so a resumed evaluation skips it


@dataclass
class ScoredCall:
    scores: list[ItemScore]
    weights: list | None  # (rows, n_experts) mixtures the call used, or None
    seconds: float


class ScoredCalls:
    """The finished scoring calls of an arm, one JSON line each in ``arms/<arm>/scored.jsonl``.

    A call is found again only under its index with the same problem ids, so a resumed arm
    repeats exactly the calls it had not finished; a line cut short by a kill is ignored.
    ``run_dir`` None keeps nothing (scores that depend on training done in this process).
    """

    def __init__(self, run_dir: Path | None, arm: str):
        self.path = None if run_dir is None else Path(run_dir) / "arms" / arm / SCORED_FILE
        self.calls: dict[int, dict] = {}
        self.new_seconds = 0.0
        if self.path is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    call = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line, written when the process died
                self.calls[call["index"]] = call

    @property
    def seconds(self) -> float:
        return self.new_seconds + sum(c["seconds"] for c in self.calls.values())

    def get(self, index: int, problems: Sequence[Problem]) -> ScoredCall | None:
        call = self.calls.get(index)
        if call is None or call["ids"] != [p.id for p in problems]:
            return None
        return ScoredCall([ItemScore(**x) for x in call["scores"]], call["weights"], call["seconds"])

    def add(self, index: int, problems: Sequence[Problem], scores: list[ItemScore], weights: list | None,
            seconds: float) -> ScoredCall:
        if self.path is None:
            self.new_seconds += seconds
            return ScoredCall(scores, weights, seconds)
        call = {"index": index, "ids": [p.id for p in problems], "scores": [asdict(x) for x in scores],
                "weights": weights, "seconds": seconds}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = self.path.is_file() and self.path.stat().st_size and not self.path.read_bytes().endswith(b"\n")
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(("\n" if torn else "") + json.dumps(call) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.calls[index] = call
        return ScoredCall(scores, weights, seconds)


def _result_path(run_dir: Path, arm: str) -> Path:
    return Path(run_dir) / "arms" / arm / RESULT_FILE


def save_arm(run_dir: Path, result: ArmResult, states: list[dict] | None = None) -> None:
    """Keep a finished arm: written atomically, read back by ``finished_arm`` on resume."""
    path = _result_path(run_dir, result.arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"result": asdict(result), "states": states}).encode())


def finished_arm(run_dir: Path, arm: str) -> tuple[ArmResult, list[dict] | None] | None:
    """The arm as saved by an earlier process of the same evaluation, or None."""
    saved = read_saved(_result_path(run_dir, arm))
    if saved is None:
        return None
    data = dict(saved["result"])
    data["scores"] = [ItemScore(**x) for x in data["scores"]]
    return ArmResult(**data), saved["states"]


def learning_summary(states: list[dict]) -> dict:
    """What one arm's learning did, counted over its episodes."""
    outcomes = [s["outcome"] for s in states]
    updates = [u for s in states for u in s.get("updates") or []]
    checks = [c for s in states for c in s.get("canary_checks") or []]
    candidates = [c for s in states for c in s.get("candidates") or []]
    trained = [t for u in updates for t in u.get("texts") or [] if t.get("source") != "replay"]
    kept = sum(update_survived(s, u) for s in states for u in s.get("updates") or [])
    return {
        "episodes": len(states),
        "right_first_try": sum(bool(s["first_try"]["correct"]) for s in states),
        **{k: outcomes.count(k) for k in ("correct", "fixed", "unfixed", "failed", "not_learned", "skipped")},
        "learned_from": sum(bool(s.get("updates")) for s in states),  # problems whose texts reached an update
        "rules": sum(len(s.get("rules") or []) for s in states),
        "rules_proposed": len(candidates),
        "rules_refused": sum(c["status"] == "refused" for c in candidates),
        "rules_validated": sum(c["status"] == "validated" for c in candidates),
        "rules_refuted": sum(c["status"] == "refuted" for c in candidates),
        "updates": len(updates),
        "updates_kept": kept,
        "updates_rolled_back": len(updates) - kept,
        "mirror_rollbacks": sum(bool(u.get("stress_rolled_back")) for u in updates),
        "canary_rollbacks": sum(bool(c.get("canary_rolled_back")) for c in checks),
        "episode_rollbacks": sum(s.get("episode_rolled_back_to") is not None for s in states),
        "texts": len(trained),
        "texts_by_source": {source: sum(t.get("source") == source for t in trained) for source in SOURCES},
        "texts_replayed": sum(t.get("source") == "replay" for u in updates for t in u.get("texts") or []),
    }


def learning_curve(states: list[dict], learn: Sequence[Problem]) -> list[dict]:
    """Per learning episode: right at the first try (against the label), outcome, and the stress phi(t)."""
    labels = {p.id: p.label for p in learn}
    curve, phi = [], None
    for index, state in enumerate(states):
        updates = state.get("updates") or []
        if updates:
            phi = updates[-1]["phi"]  # the controller's reading at the episode's last update
        label = labels.get(state["problem"]["id"])
        first = Attempt(**state["first_try"]["attempt"])
        curve.append({
            "episode": index, "id": state["problem"]["id"],
            "first_correct": bool(check(first, label).correct) if label is not None else bool(state["first_try"]["correct"]),
            "outcome": state["outcome"], "updates": len(updates), "phi": phi,
            "experts": [u["expert"] for u in updates],
        })
    return curve


def _leak_check(scored: Sequence[Problem], states_by_arm: dict[str, list[dict]]) -> dict:
    """Rules and training texts (every loop arm) that contain an evaluation question, up to spacing and case."""
    questions = [normalise_question(p.question) for p in scored]
    states = [s for arm_states in states_by_arm.values() for s in arm_states]
    rules = [normalise_question(r["text"]) for s in states for r in s.get("rules") or []]
    texts = [normalise_question(t["prompt"] + "\n" + t["completion"])
             for s in states for u in s.get("updates") or [] for t in u.get("texts") or []]
    hits = sum(any(q in t for q in questions) for t in rules + texts)
    return {"rules": len(rules), "training_texts": len(texts), "containing_an_evaluation_question": hits}


def evaluate(
    config: EvalConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    loader: Callable[[], LoadedModel] | None = None,
    backend: Callable[[LoadedModel, ExpertBank | None], GenerationBackend] | None = None,
    embedder=None,
    on_progress: Callable[[EvalProgress], None] | None = None,
    stop: StopFlag | None = None,
    problems: ProblemSets | None = None,
) -> EvalReport:
    """Run every arm of ``config`` under its protocol; write report.json, report.md and plots to run_dir.

    ``loader`` gives a fresh model per arm (default: ``load_model(config.model)``; a bank is
    injected in place, so arms never share a model object). ``backend(loaded, bank)`` builds the
    generation backends of an arm once its bank exists (bank None for the frozen arm; default:
    ``make_backend(config.backend, ...)``, the same kind for scoring and learning in every arm:
    arms are compared answer by answer, so they must share numerics). ``embedder`` overrides
    ``config.embedder``. ``stop`` (a StopFlag) ends the run after the running node; call again
    with ``resume=True`` to continue. ``problems`` replaces the draw from the config's data
    (``prepare_problems(config)``); holdout sets are checked disjoint either way.
    """
    from graph.report import write_report

    run_dir = Path(run_dir)
    begin = time.perf_counter()
    sets = problems if problems is not None else prepare_problems(config)
    if config.protocol == "holdout":
        check_disjoint(sets.learn, sets.scored)
    elif [p.id for p in sets.learn] != [p.id for p in sets.scored]:
        raise DataError(f"protocol {config.protocol} learns on the scored problems themselves: learn must equal scored")
    _prepare_eval_dir(run_dir, config, sets, resume)
    precision = choose_precision(config.precision, pick_device(None).type)
    run = _Run(config, run_dir, loader, backend, on_progress, stop,
               embedder if embedder is not None else make_embedder(config.embedder), precision, sets)

    arms: dict[str, ArmResult] = {}
    extra: dict = {"precision": precision.to_dict()}

    def once(arm: str, compute):
        """An arm computed, or read back when an earlier process of this evaluation finished it."""
        done = finished_arm(run_dir, arm) if resume else None
        if done is not None:
            log.info("%s arm: finished earlier, read from %s", arm, _result_path(run_dir, arm))
            return done
        result, states = compute()
        save_arm(run_dir, result, states)
        gc.collect()  # each arm loads its own model: free the last one before the next loads
        return result, states

    frozen_pool, _ = once("frozen", lambda: (run.frozen(sets.scored), None))
    scored = sets.scored
    if config.protocol == "recovery":
        failed = [p for p, s in zip(sets.scored, frozen_pool.scores) if not s.correct]
        extra["recovery_pool"] = {"n": len(sets.scored), "frozen_correct": frozen_pool.correct,
                                  "rescored_failed": len(failed)}
        scored = failed
        log.info("recovery: the frozen model failed %d of %d problems; those are re-scored", len(failed), len(sets.scored))
        keep = {p.id for p in failed}
        frozen_pool.scores = [s for s in frozen_pool.scores if s.id in keep]
    arms["frozen"] = frozen_pool
    if "vote" in config.arms:
        arms["vote"], _ = once("vote", lambda: (run.vote(scored), None))

    states_by_arm: dict[str, list[dict]] = {}
    for arm in (a for a in config.arms if a in LOOP_ARMS):
        arms[arm], states_by_arm[arm] = once(arm, lambda arm=arm: run.loop_arm(arm, sets, scored, resume))
    if "single-lora" in config.arms:
        missing = [u for s in states_by_arm["adapters"] for u in s.get("updates") or [] if "texts" not in u]
        if missing:
            raise RunDirError("the adapters arm's updates carry no training texts (made by an older version); "
                              "run the evaluation in a new --run-dir")
        # The adapters arm's own texts, burst by burst; its replayed texts are not trained twice.
        bursts = [[[TrainingExample(t["prompt"], t["completion"]) for t in u["texts"] if t.get("source") != "replay"]
                   for u in s.get("updates") or []] for s in states_by_arm["adapters"]]
        arms["single-lora"], _ = once("single-lora", lambda: (run.single_lora(bursts, sets, scored), None))

    comparisons = {name: compare([s.correct for s in arms["frozen"].scores], [s.correct for s in r.scores])
                   for name, r in arms.items() if name != "frozen"}
    if "vote" in arms:  # the compute-matched baseline: does learning beat majority voting at equal samples?
        extra["vs_vote"] = {name: compare([s.correct for s in arms["vote"].scores], [s.correct for s in r.scores]).to_dict()
                            for name, r in arms.items() if name not in ("frozen", "vote")}
    report = EvalReport(
        protocol=config.protocol,
        protocol_note=PROTOCOL_NOTES[config.protocol],
        config=config.to_dict(),
        items=[{"id": p.id, "question": p.question, "label": p.label} for p in scored],
        learn_ids=[p.id for p in sets.learn],
        arms=arms,
        comparisons=comparisons,
        leak_check=_leak_check(scored, states_by_arm) if config.protocol == "holdout" else {"not_applicable": config.protocol},
        run_dir=str(run_dir),
        seconds=time.perf_counter() - begin,
        extra=extra,
        data_sources=sets.sources,
    )
    write_report(report, run_dir, plots=config.plots)
    return report
