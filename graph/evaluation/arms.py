"""The arms of an evaluation: scoring the frozen model, majority voting, the loop's arms and a single LoRA.

Every arm scores the same problems greedily, in calls of several batches, each finished call
kept (``ScoredCalls``) so that a killed arm resumes after its last finished call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from adapters.bank import ExpertBank
from adapters.stack import build_adapters
from adapters.trainer import TrainingExample
from agents.files import atomic_write_bytes
from agents.gsm8k import Problem
from agents.lm.backend import GenerationBackend, ask_together, close_backend, make_backend, opened
from agents.lm.generation import Sampling
from agents.lm.models import LoadedModel, load_model
from agents.lm.precision import PrecisionChoice
from agents.solver import Attempt, Solver, SolverConfig
from agents.verifier import VerifierConfig, check, vote
from graph.context import RunContext
from graph.episodes import StopFlag, describe_episode, read_events, run_episodes
from graph.evaluation.config import EvalConfig, EvalInterrupted, arm_settings
from graph.evaluation.learning import arm_episode_timing, learning_curve, learning_summary
from graph.evaluation.problems import ProblemSets
from graph.evaluation.results import ArmResult, EvalProgress, ItemScore, ScoredCalls
from graph.routing import route
from graph.run_dir import prepare_run_dir
from graph.runner import build_context, check_questions_fit, problem_data

log = logging.getLogger(__name__)

SCORE_CALL_BATCHES = 4  # batches' worth of problems per scoring call (see ArmRunner.score)


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


@dataclass
class Scored:
    scores: list[ItemScore]  # in the order of the problems
    mixtures: list[torch.Tensor]  # (call rows, n_experts) per scoring call that routed through the bank
    seconds: float  # spent generating, kept calls included


class ArmRunner:
    """The arms of one ``evaluate`` call: its config, how models and backends are made, progress and stop."""

    def __init__(self, config: EvalConfig, run_dir: Path, sets: ProblemSets, precision: PrecisionChoice, embedder,
                 loader: Callable[[], LoadedModel] | None = None,
                 backend: Callable[[LoadedModel, ExpertBank | None], GenerationBackend] | None = None,
                 on_progress: Callable[[EvalProgress], None] | None = None, stop: StopFlag | None = None):
        self.config, self.run_dir, self.sets = config, run_dir, sets
        self._load = loader or (lambda: load_model(config.model, dtype=precision.used))
        self._fit_checked = False
        self.make_backend = backend
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

    def backend_for(self, loaded: LoadedModel, bank: ExpertBank | None) -> contextlib.AbstractContextManager:
        """``with runner.backend_for(loaded, bank) as backend:`` the arm's generation backend, closed after."""
        if self.make_backend is not None:
            return opened(self.make_backend(loaded, bank))
        return make_backend(self.config.backend, loaded, bank, batch_size=self.config.batch_size,
                            max_new_tokens=self.config.max_new_tokens)

    def score(self, arm: str, solver: Solver, problems: Sequence[Problem], route, keep: bool = True) -> Scored:
        """Score problems in calls of several batches; route(questions) gives (rules, weights) for a call.

        A call holds SCORE_CALL_BATCHES batches' worth of problems: continuous batching refills
        its slots within a call, and progress is reported after each. With ``keep``, each finished
        call is kept (``ScoredCalls``), so a killed arm resumes after its last finished call.
        """
        kept = ScoredCalls(self.run_dir if keep else None, arm)
        scores, mixtures = [], []
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
                mixtures.append(torch.tensor(done.weights))  # (chunk, n_experts)
            right = sum(score.correct for score in scores)
            self.progress(arm, "score", len(scores), len(problems),
                          finished=f"{arm}: scored {len(scores)}/{len(problems)}, {right} right" if len(scores) == len(problems) else "")
        return Scored(scores, mixtures, kept.seconds)

    # -- frozen

    def frozen(self, problems: Sequence[Problem]) -> ArmResult:
        loaded = self.loader()
        with self.backend_for(loaded, None) as backend:
            scored = self.score("frozen", Solver(backend, self.solver_config), problems, lambda qs: ([[] for _ in qs], None))
        return ArmResult("frozen", scored.scores, {"learn": 0.0, "score": scored.seconds}, backend=backend.description)

    # -- vote: the compute-matched baseline

    def vote(self, problems: Sequence[Problem]) -> ArmResult:
        """The frozen model's majority answer over k sampled answers, k = what the loop samples per problem."""
        cfg = self.config
        k = cfg.verifier.samples
        sampling = Sampling(temperature=cfg.verifier.temperature, seed=cfg.seed)
        kept = ScoredCalls(self.run_dir, "vote")
        scores: list[ItemScore] = []
        loaded = self.loader()
        with self.backend_for(loaded, None) as backend:
            solver = Solver(backend, self.solver_config)
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
        return ArmResult("vote", scores, {"learn": 0.0, "score": kept.seconds},
                         {"samples_per_problem": k, "temperature": cfg.verifier.temperature}, backend=backend.description)

    # -- loop arms

    def loop_arm(self, arm: str, scored: Sequence[Problem], resume: bool) -> tuple[ArmResult, list[dict]]:
        """The loop learns on the learning problems in the arm's own run folder; then the arm is scored."""
        cfg, sets = self.config, self.sets
        arm_dir = self.run_dir / "arms" / arm
        settings = arm_settings(cfg, arm, len(sets.learn))
        prepare_run_dir(arm_dir, settings, resume)
        log.info("%s arm: learning on %d problems in %s", arm, len(sets.learn), arm_dir)
        loaded = self.loader()
        ctx = build_context(loaded, settings, arm_dir, embedder=self.embedder)
        if self.make_backend is not None:
            ctx = ctx.with_backend(self.make_backend(loaded, ctx.bank))  # built after the bank
        with ctx:
            states, learning, learn_seconds = self._learn(arm, ctx, arm_dir, settings.round_size)
            if cfg.protocol == "stream":
                # Online: the score is each episode's first attempt, made before learning on it.
                start = time.perf_counter()
                by_id = {p.id: p for p in sets.learn}
                scores = [_score(by_id[s["problem"]["id"]], Attempt(**s["first_try"]["attempt"])) for s in states]
                result = Scored(scores, [], time.perf_counter() - start)
                scored_by = ctx.backend.description
            else:
                close_backend(ctx.backend)  # learning is over: free it before the scoring backend loads
                with self.backend_for(loaded, ctx.bank) as backend:
                    solver = Solver(backend, ctx.solver.config)
                    result = self.score(arm, solver, scored, lambda qs: self._route(ctx, solver, arm, qs))
                    learning["forgetting"] = self._forgetting(arm, ctx, solver, states)
                scored_by = backend.description
            arm_result = ArmResult(arm, result.scores, {"learn": learn_seconds, "score": result.seconds}, learning,
                                   learning_curve(states, sets.learn), backend=scored_by)
            if arm != "rules":
                n = ctx.bank.n_experts
                # Stream episodes keep only their latest mixture, not the first one: no mean is shown there.
                mean = torch.cat(result.mixtures).mean(0).tolist() if result.mixtures else None  # (n_experts,)
                updates = (states[-1]["carry"].get("expert_updates") if states else None) or [0] * n
                arm_result.expert_usage = {"mean_weight": mean, "updates": list(updates)}
        return arm_result, states

    def _learn(self, arm: str, ctx: RunContext, arm_dir: Path, round_size: int) -> tuple[list[dict], dict, float]:
        """Every learning episode of the arm (finished ones read back); their states, summary and wall time."""
        stream = [problem_data(p, learning=True, label_free=self.config.label_free) for p in self.sets.learn]
        states: list[dict] = []
        start = time.perf_counter()

        def on_event(event) -> None:
            self.progress(arm, "learn", len(states), len(stream), f"episode {event.episode + 1} {event.node}")

        for state in run_episodes(ctx, stream, run_dir=arm_dir, round_size=round_size, stop=self.stop,
                                  on_event=on_event):
            states.append(state)
            line = f"{arm}: learning episode {len(states)}/{len(stream)}: {describe_episode(state)}"
            self.progress(arm, "learn", len(states), len(stream), finished=line)
        if len(states) < len(stream):
            raise EvalInterrupted(f"stopped while the {arm} arm was learning (episode {len(states) + 1} of {len(stream)})")
        # Each episode's wall time as the sum of its nodes' (a pooled call counts the episode's share by rows)
        learning = {**learning_summary(states), **arm_episode_timing(read_events(arm_dir)[0], len(states)), "round_size": round_size,
                    "round_gate": ctx.config.round_gate, "pool_updates": ctx.config.pool_updates,
                    "backend": ctx.backend.description,
                    "canary": {"size": ctx.config.canary_size, "test": ctx.config.canary_test,
                               "margin": ctx.config.canary_margin, "alpha": ctx.config.canary_alpha}}
        return states, learning, time.perf_counter() - start

    def _forgetting(self, arm: str, ctx: RunContext, solver: Solver, states: list[dict]) -> dict | None:
        """The learning problems right at their first try (by their labels), asked again greedily after learning.

        Each is asked as the arm answers (its rules and mixture) and by the frozen model, in one
        call per scoring chunk: how many the arm lost is set against how many the frozen model
        gets wrong too, since a greedy answer right at the first try may have been right by a
        narrow margin. None when the learning problems have no labels.
        """
        labels = {p.id: p.label for p in self.sets.learn if p.label is not None}
        if not labels:
            return None
        right = [s["problem"] for s in states if s["problem"]["id"] in labels
                 and check(Attempt(**s["first_try"]["attempt"]), labels[s["problem"]["id"]]).correct]
        start = time.perf_counter()
        kept, frozen = [], []
        for chunk in _chunks(right, SCORE_CALL_BATCHES * self.config.batch_size):
            questions = [p["question"] for p in chunk]
            # Each blind to its own episode in memory, as the loop routes an episode's own problem.
            rules, weights = self._route(ctx, solver, arm, questions, exclude=[p["id"] for p in chunk])
            after, bare = ask_together(solver.backend, [solver.ask(questions, rules, weights=weights),
                                                        solver.ask(questions, weights=None)])
            kept += [check(a, labels[p["id"]]).correct for p, a in zip(chunk, after)]
            frozen += [check(a, labels[p["id"]]).correct for p, a in zip(chunk, bare)]
        return {"checked": len(right), "right_after": sum(kept), "right_frozen": sum(frozen),
                "lost": [p["id"] for p, ok in zip(right, kept) if not ok],
                "seconds": round(time.perf_counter() - start, 3)}

    @staticmethod
    def _route(ctx: RunContext, solver: Solver, arm: str, questions: list[str],
               exclude: list[str] | None = None):
        """The arm's prompt rules and mixture weights (batch, n_experts), as the loop's solve node routes.

        ``exclude``: per question, a problem whose memories it must not see (graph.routing.route).
        """
        use_adapters = arm in ("adapters", "full")
        routes = route(ctx, questions, exclude=exclude, with_rules=arm in ("rules", "full"),
                       with_adapters=use_adapters, solver=solver)
        weights = torch.cat([r.weights for r in routes]) if use_adapters else None  # None: the bare model
        return [r.rules for r in routes], weights

    # -- single LoRA

    def single_lora(self, bursts: list[list[list[TrainingExample]]], scored: Sequence[Problem]) -> ArmResult:
        """One expert, forced routing: trained burst by burst on the adapters arm's texts."""
        cfg, sets = self.config, self.sets
        arm_dir = self.run_dir / "arms" / "single-lora"
        loaded = self.loader()
        bank_config = replace(cfg.bank, n_experts=1, shared_expert=0, seed=cfg.seed)
        router_config = replace(cfg.router, mode="forced", memory_dim=0, seed=cfg.seed)
        adapters = build_adapters(loaded.model, loaded.tokenizer, bank_config, router_config, stress=cfg.stress,
                                  trainer=cfg.trainer, bank_dir=arm_dir / "bank")
        bank, trainer = adapters.bank, adapters.trainer
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
                                "loss_after": result.loss_after, "stress_rolled_back": result.stress_rolled_back,
                                "texts": len(burst)})
                trained += 1
                self.progress("single-lora", "train", trained, total_bursts)

        route = lambda qs: ([[] for _ in qs], one)  # noqa: E731
        with self.backend_for(loaded, bank) as backend:
            solver = Solver(backend, self.solver_config)
            if cfg.protocol == "stream":
                # Online like the loop: score problem i with the LoRA trained on the bursts of episodes < i.
                scores = []
                for problem, episode_bursts in zip(sets.learn, bursts):
                    start = time.perf_counter()
                    scores += self.score("single-lora", solver, [problem], route, keep=False).scores
                    score_seconds += time.perf_counter() - start
                    train(episode_bursts)
            else:
                for episode_bursts in bursts:
                    train(episode_bursts)
                start = time.perf_counter()
                scores = self.score("single-lora", solver, scored, route, keep=False).scores
                score_seconds = time.perf_counter() - start
        # Saved as a run directory of its own, so `export --run-dir .../single-lora --expert 0` works.
        adapters.store.save(extra={"model": cfg.model, "arm": "single-lora"})
        settings = replace(arm_settings(cfg, "adapters", len(sets.learn)), bank=bank_config, router=router_config)
        atomic_write_bytes(arm_dir / "run.json", json.dumps(settings.to_dict(), indent=2).encode())
        learning = {"bursts": len(results), "texts": sum(r["texts"] for r in results),
                    "stress_rolled_back": sum(r["stress_rolled_back"] for r in results),
                    "source": "every update burst of the adapters arm, in order, including bursts the loop later undid"}
        return ArmResult("single-lora", scores, {"learn": train_seconds, "score": score_seconds}, learning,
                         backend=backend.description)
