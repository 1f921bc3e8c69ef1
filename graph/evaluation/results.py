"""What an evaluation produces: per-item scores, per-arm results, the report, and what is kept for a resume.

A finished scoring call is appended to ``arms/<arm>/scored.jsonl`` and a finished arm is
written to ``arms/<arm>/result.json``, so a killed evaluation repeats only unfinished work.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from agents.files import atomic_write_bytes
from agents.gsm8k import Problem
from graph.evaluation.stats import PairedComparison, compare, wilson_interval
from graph.saved_settings import SettingsError, read_saved


# How an answer's final number was found (agents/answers.extract_answer's strategies): the
# solver's own answer line first, then the others in extract_answer's order of preference.
ANSWER_FORMS = ("answer_is", "boxed", "hash", "last_number", "none")


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
    code: str = ""  # the code version that finished the arm (graph/evaluation/provenance.py)
    machine: dict | None = None  # the machine that finished it (provenance.machine); None in older results

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

    def answer_forms(self, cap: int) -> dict[str, dict[str, int]] | None:
        """How the answers gave their final number (agents/answers.extract_answer's strategies) and how
        many reached the ``cap`` of new tokens, each as {"n", "right"}; None for a vote arm, whose
        answers are majorities of several texts."""
        if any(s.strategy == "vote" for s in self.scores):
            return None
        groups = {form: [s for s in self.scores if s.strategy == form] for form in ANSWER_FORMS}
        groups["at_cap"] = [s for s in self.scores if s.tokens >= cap]
        return {form: {"n": len(group), "right": sum(s.correct for s in group)} for form, group in groups.items()}

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
            "tokens": self.tokens, "seconds": self.seconds, "backend": self.backend, "code": self.code,
            "machine": self.machine,
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


def keep_failed(frozen: ArmResult) -> dict:
    """The recovery protocol's pool: ``frozen`` cut down, in place, to the problems it failed (those
    every arm re-scores); what it came from, for the report."""
    pool = {"n": frozen.n, "frozen_correct": frozen.correct, "rescored_failed": frozen.n - frozen.correct}
    frozen.scores = [s for s in frozen.scores if not s.correct]
    return pool


def compare_arms(arms: dict[str, ArmResult]) -> tuple[dict[str, PairedComparison], dict[str, dict]]:
    """Every arm against frozen, and every learning arm against vote (the compute-matched baseline:
    does learning beat majority voting at equal samples?), each where that baseline is among ``arms``;
    paired by problem id, on the problems both scored."""
    def paired(baseline: ArmResult, arm: ArmResult) -> PairedComparison:
        theirs = {s.id: s.correct for s in arm.scores}
        shared = [s for s in baseline.scores if s.id in theirs]
        return compare([s.correct for s in shared], [theirs[s.id] for s in shared])

    vs_frozen = {name: paired(arms["frozen"], r) for name, r in arms.items() if name != "frozen" and "frozen" in arms}
    vs_vote = {name: paired(arms["vote"], r).to_dict() for name, r in arms.items()
               if name not in ("frozen", "vote") and "vote" in arms}
    return vs_frozen, vs_vote


def result_path(run_dir: Path, arm: str) -> Path:
    return Path(run_dir) / "arms" / arm / RESULT_FILE


def save_arm(run_dir: Path, result: ArmResult, states: list[dict] | None = None) -> None:
    """Keep a finished arm: written atomically, read back by ``finished_arm`` on resume."""
    path = result_path(run_dir, result.arm)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({"result": asdict(result), "states": states}).encode())


def finished_arm(run_dir: Path, arm: str) -> tuple[ArmResult, list[dict] | None] | None:
    """The arm as saved by an earlier process of the same evaluation, or None."""
    path = result_path(run_dir, arm)
    saved = read_saved(path)
    if saved is None:
        return None
    try:
        data = dict(saved["result"])
        data["scores"] = [ItemScore(**x) for x in data["scores"]]
        return ArmResult(**data), saved["states"]
    except (KeyError, TypeError, ValueError) as err:
        raise SettingsError(f"{path}: not a finished arm's result ({err!r})") from None
