"""The loop's graph state: serializable data only (ids, texts, numbers, file references)."""

from __future__ import annotations

import operator
from typing import Annotated, TypedDict


class ProblemData(TypedDict, total=False):
    id: str
    question: str
    label: str | None  # None in label-free runs
    split: str
    solution: str | None  # only for problems the loop may learn from; never for evaluation problems


class Carry(TypedDict, total=False):
    """What one episode hands to the next: kept in the checkpoint, so a resumed run has it too."""

    canary: list[ProblemData]  # problems solved at the first try, re-solved after every update
    expert_updates: list[int]  # updates each expert has received
    solved_first: int  # episodes right at the first try so far
    solved_final: int  # episodes right at the end so far
    episodes: int  # episodes finished so far


class LoopState(TypedDict, total=False):
    run_id: str
    episode: int
    problem: ProblemData
    learning: bool  # the loop may reflect on and train from this problem
    cycle: int  # reflect/update rounds done so far
    attempt: dict  # the latest solve: text, answer, strategy, tokens
    first: dict  # the verdict before any learning on this problem
    verdict: dict  # the latest verdict
    weights: list[float]  # the expert mixture the latest solve used
    memory_rule_ids: list[str]  # remembered rules put into the solve prompt
    rule: dict | None  # the current rule: text, attempts, rejected
    rules: Annotated[list[dict], operator.add]  # every rule of this episode, in order
    texts: list[dict]  # the diversified training texts of the current rule
    updates: Annotated[list[dict], operator.add]  # every update of this episode
    canary_checks: Annotated[list[dict], operator.add]  # every regression check of this episode
    rolled_back_to: str | None  # the snapshot the episode's updates were undone to, if any
    outcome: str  # correct | fixed | unfixed | not_learned | failed
    error: str | None
    carry: Carry
