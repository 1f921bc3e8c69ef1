"""A short solve-and-update demo: score test problems, train one expert on train problems, score again.

The learning problems come from the train split and the scored ones from the test split,
so no scored problem or its answer is ever in the training text (protocol "holdout").
With a few problems and a few steps, expect few or no flips: this shows the machinery
running on a real model, it does not measure a gain.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable


from adapters.bank import BankConfig, ExpertBank
from adapters.router import Router, RouterConfig
from adapters.store import BankStore, atomic_write_bytes
from adapters.trainer import TestTimeTrainer, TrainingExample
from agents.backend import TorchBackend
from agents.errors import DataError
from agents.gsm8k import Problem, load_problems
from agents.models import DEFAULT_MODEL, load_model
from agents.prompts import SOLUTION_COMPLETION
from agents.solver import Attempt, Solver, SolverConfig
from agents.verifier import check

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    model: str = DEFAULT_MODEL  # model spec (alias, folder, .gguf path or hub id)
    eval_data: str = "test"  # scored problems: 'test' or a JSON-lines path
    learn_data: str = "train"  # learning problems: 'train' or a JSON-lines path
    eval_problems: int = 3  # how many problems to score before and after
    learn_problems: int = 2  # how many reference solutions to train on
    steps: int = 4  # optimizer steps in the update burst
    expert: int = 1  # the expert to train (the stress controller may pick the shared one)
    max_new_tokens: int = 320  # generation cap per answer
    run_dir: Path = Path("runs/demo")  # where the bank and report are written

    def __post_init__(self) -> None:
        for name in ("eval_problems", "learn_problems", "steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        self.run_dir = Path(self.run_dir)


@dataclass
class ScoredAnswer:
    problem_id: str
    label: str
    answer: str | None
    strategy: str
    correct: bool
    tokens: int


@dataclass
class DemoReport:
    protocol: str
    model: str
    learn_ids: list[str]
    before: list[ScoredAnswer]
    after: list[ScoredAnswer]
    update: dict
    seconds: dict = field(default_factory=dict)
    backend: str = ""  # what generated the answers

    def accuracy(self, which: str) -> float:
        rows = getattr(self, which)
        return sum(r.correct for r in rows) / len(rows)


def _score(problems: list[Problem], attempts: list[Attempt]) -> list[ScoredAnswer]:
    rows = []
    for problem, attempt in zip(problems, attempts):
        verdict = check(attempt, problem.label)
        rows.append(ScoredAnswer(problem.id, problem.label, attempt.answer, attempt.strategy, verdict.correct, attempt.tokens))
    return rows


def run_demo(config: DemoConfig, status: Callable[[str], None] = log.info) -> DemoReport:
    seconds = {}
    start = time.perf_counter()
    loaded = load_model(config.model)
    seconds["load"] = time.perf_counter() - start
    status(f"loaded {config.model} from {loaded.source} on {loaded.device} ({loaded.dtype}) in {seconds['load']:.0f}s")
    model, tok = loaded.model, loaded.tokenizer

    scored = load_problems(config.eval_data, limit=config.eval_problems)
    learn = load_problems(config.learn_data, limit=config.learn_problems)
    overlap = {p.question for p in scored} & {p.question for p in learn}
    if overlap:
        raise DataError(f"{len(overlap)} problem(s) are both scored and learned from; use disjoint files")
    if any(p.label is None for p in scored + learn):
        raise DataError("the demo needs labelled problems (an 'answer' ending in '#### N')")

    bank = ExpertBank(model, BankConfig())
    router = Router(model.config.hidden_size, bank.n_experts, RouterConfig())
    trainer = TestTimeTrainer(model, tok, bank, router)
    # Before and after run on one backend, torch, the only one that applies an expert cheaply:
    # a llama.cpp "before" would differ from a torch "after" by kernel numerics alone.
    backend = TorchBackend(model, tok, bank)
    status(f"backend: {backend.description}")
    solver = Solver(backend, SolverConfig(max_new_tokens=config.max_new_tokens))
    questions = [p.question for p in scored]

    status(f"solving {len(scored)} test problems with the frozen model")
    start = time.perf_counter()
    before = _score(scored, solver.solve(questions))
    seconds["solve_before"] = time.perf_counter() - start

    examples = [
        TrainingExample(solver.prompt(p.question), SOLUTION_COMPLETION.format(solution=p.solution, label=p.label))
        for p in learn
    ]
    status(f"training on {len(learn)} train-split solutions, {config.steps} steps")
    start = time.perf_counter()
    result = trainer.update(examples, target_expert=config.expert, steps=config.steps)
    seconds["update"] = time.perf_counter() - start
    status(f"update: mode {result.mode}, phi {result.phi:.2f}, lr {result.lr:g}, expert {result.expert}, "
           f"loss {result.loss_before:.3f} -> {result.loss_after:.3f}")

    status(f"solving the same {len(scored)} test problems through expert {result.expert}")
    start = time.perf_counter()
    after = _score(scored, solver.solve(questions, weights=bank.one_hot(result.expert)))
    seconds["solve_after"] = time.perf_counter() - start

    BankStore(config.run_dir / "bank").save(bank, router, trainer.stress, extra={"model": config.model})
    update = {k: v for k, v in asdict(result).items() if k != "steps"}
    update["step_losses"] = [s["loss_lm"] for s in result.steps]
    report = DemoReport(
        protocol="holdout (learned on train-split solutions; scored test problems never trained on)",
        model=config.model,
        learn_ids=[p.id for p in learn],
        before=before,
        after=after,
        update=update,
        seconds=seconds,
        backend=backend.description,
    )
    atomic_write_bytes(config.run_dir / "demo_report.json", json.dumps(asdict(report), indent=2).encode())
    return report

