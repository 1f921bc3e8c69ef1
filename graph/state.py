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


class CanaryData(TypedDict):
    """A problem right at its first try, guarding later updates (graph/canary.canary_entry)."""

    id: str
    question: str
    label: str | None  # label-free: the confident majority answer
    share: float  # share of its first try's samples that verified: how firmly it was right
    samples: int  # how many samples that share is of


class AttemptData(TypedDict):
    """``agents.solver.Attempt`` as state: one answer of the model."""

    text: str  # the model's whole answer
    answer: str | None  # the extracted final number; None if none was found
    strategy: str  # how it was extracted: boxed | answer_is | hash | last_number | none
    tokens: int  # tokens generated


class VerdictData(TypedDict):
    """``agents.verifier.Verdict`` as state, with the attempt it judged."""

    attempt: AttemptData
    correct: bool  # with a label: matches it; label-free: matches the confident majority
    answer: str | None  # the answer judged
    strategy: str  # its extraction strategy
    confidence: float  # 1.0 against a label; the samples' agreement share when label-free
    label_free: bool
    votes: dict[str, int]


class EpisodeCarryOver(TypedDict, total=False):
    """What one episode hands to the next: kept in the checkpoint, so a resumed run has it too."""

    canary: list[CanaryData]  # problems solved at the first try, re-solved after every update
    expert_updates: list[int]  # updates each expert has received
    replay: dict[str, list[dict]]  # per expert (as a string key): its latest verified training texts, each with its problem
    solved_first: int  # episodes right at the first try so far
    solved_final: int  # episodes right at the end so far
    episodes: int  # episodes finished so far


class EpisodeInput(TypedDict):
    """What starts an episode (graph/episodes.py): the rest of ``LoopState`` is written by the nodes."""

    run_id: str
    episode: int
    problem: ProblemData
    learning: bool  # the loop may reflect on and train from this problem
    carry: EpisodeCarryOver
    rules: list[dict]  # empty: the lists the nodes append to start empty
    updates: list[dict]
    canary_checks: list[dict]


class LoopState(TypedDict, total=False):
    run_id: str
    episode: int
    problem: ProblemData
    learning: bool  # the loop may reflect on and train from this problem
    cycle: int  # reflect/update rounds done so far
    attempt: AttemptData  # the latest greedy solve
    samples: list[AttemptData]  # the first solve's sampled answers (rule-free prompt), the base of every share
    memory_rules: list[str]  # remembered rules put into the solve prompt
    target: str | None  # what an answer must equal: the label, or label-free the majority's pseudo-label
    verified_share: float  # share of the sampled answers that reach the target
    own_verified: list[str]  # the distinct verified solutions among the first solve's answers
    unverifiable: bool  # label-free and too little agreement: the problem is skipped
    first_try: VerdictData  # the verdict before any learning on this problem
    verdict: VerdictData  # the latest verdict
    weights: list[float]  # the expert mixture the latest solve used
    memory_rule_ids: list[str]  # remembered rules put into the solve prompt
    rule: dict | None  # the current validated rule: text, cycle, share_with, share_without
    rules: Annotated[list[dict], operator.add]  # every rule tested by effect (validated or refuted), in order
    candidates: Annotated[list[dict], operator.add]  # every rule candidate, with its status and reason
    texts: list[dict]  # verified training texts waiting for the next update: question, completion, source
    unsound: Annotated[list[dict], operator.add]  # right answers refused for unsound steps: source, reason
    variants: list[dict]  # the latest diversify's variants: kept or refused, with the reason
    updates: Annotated[list[dict], operator.add]  # every update of this episode
    canary_checks: Annotated[list[dict], operator.add]  # every regression check of this episode
    episode_rolled_back_to: str | None  # the snapshot the rollback node undid the episode's updates to, if any
    # Round gate (graph/episodes.py): handed by the driver before each update. rollback_to: the bank
    # snapshot before this phase's first update of the round; canary: the round's problems right at
    # the first try, guarded with the run's canary set; trained: those of them that train. With pooled
    # updates, pool (for the phase's first episode): the other waiting episodes' texts, each with its
    # problem_id, trained with its own; pooled_into (for the others): that update's record, less its texts.
    gate: dict | None
    outcome: str  # correct | fixed | unfixed | not_learned | failed | skipped
    committed: bool  # set by commit alone: the episode is finished (graph/episodes.py resumes any other)
    error: str | None
    carry: EpisodeCarryOver
