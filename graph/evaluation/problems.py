"""The problems of an evaluation: drawn by seed from their sources, and disjoint in holdout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from agents.data_sources import DataSource, open_source
from agents.errors import DataError
from agents.gsm8k import Problem, normalise_question, sample_problems
from graph.evaluation.config import EvalConfig


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
