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
    replay: dict[str, list[dict]]  # per expert (as a string key): its latest verified training texts
    solved_first: int  # episodes right at the first try so far
    solved_final: int  # episodes right at the end so far
    episodes: int  # episodes finished so far


class LoopState(TypedDict, total=False):
    run_id: str
    episode: int
    problem: ProblemData
    learning: bool  # the loop may reflect on and train from this problem
    cycle: int  # reflect/update rounds done so far
    attempt: dict  # the latest greedy solve: text, answer, strategy, tokens
    samples: list[dict]  # the first solve's sampled answers (rule-free prompt), the base of every share
    memory_rules: list[str]  # remembered rules put into the solve prompt
    target: str | None  # what an answer must equal: the label, or label-free the majority's pseudo-label
    verified_share: float  # share of the sampled answers that reach the target
    own_verified: list[str]  # the distinct verified solutions among the first solve's answers
    unverifiable: bool  # label-free and too little agreement: the problem is skipped
    first: dict  # the verdict before any learning on this problem
    verdict: dict  # the latest verdict
    weights: list[float]  # the expert mixture the latest solve used
    memory_rule_ids: list[str]  # remembered rules put into the solve prompt
    rule: dict | None  # the current validated rule: text, cycle, share_with, share_without
    rules: Annotated[list[dict], operator.add]  # every rule tested by effect (validated or refuted), in order
    candidates: Annotated[list[dict], operator.add]  # every rule candidate, with its status and reason
    texts: list[dict]  # verified training texts waiting for the next update: question, completion, source
    variants: list[dict]  # the latest diversify's variants: kept or refused, with the reason
    updates: Annotated[list[dict], operator.add]  # every update of this episode
    canary_checks: Annotated[list[dict], operator.add]  # every regression check of this episode
    rolled_back_to: str | None  # the snapshot the episode's updates were undone to, if any
    outcome: str  # correct | fixed | unfixed | not_learned | failed | skipped
    committed: bool  # set by commit alone: the episode is finished (graph/runner.py resumes any other)
    error: str | None
    carry: Carry
