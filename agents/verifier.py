"""The verifier: parse the final number and compare it with the label, or, label-free, by agreement."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from agents.answers import parse_number, same_number
from agents.solver import Attempt


@dataclass
class VerifierConfig:
    samples: int = 6  # answers sampled per problem besides the greedy one (RFT/TTRL use several)
    temperature: float = 0.8  # sampling temperature for those answers
    min_agreement: float = 0.5  # label-free: share of samples that must agree for the majority to be a pseudo-label

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for a vote, got {self.samples}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"min_agreement must be in (0, 1], got {self.min_agreement}")


@dataclass
class Verdict:
    correct: bool  # with a label: matches it; label-free: the majority is confident enough
    answer: str | None  # the answer judged (the majority answer when label-free)
    strategy: str  # extraction strategy of the judged answer, or "vote"
    confidence: float  # 1.0 against a label; the agreement share when label-free
    label_free: bool
    votes: dict[str, int] = field(default_factory=dict)


def check(attempt: Attempt, label: str) -> Verdict:
    """Compare an attempt's parsed final number with the label, numerically."""
    correct = attempt.answer is not None and same_number(parse_number(attempt.answer), parse_number(label))
    return Verdict(correct, attempt.answer, attempt.strategy, 1.0, label_free=False)


def vote(samples: Sequence[Attempt], config: VerifierConfig) -> Verdict:
    """Label-free: the majority of the sampled answers, accepted if enough of them agree."""
    if not samples:
        raise ValueError("a vote needs at least one sample")
    values = [parse_number(a.answer) if a.answer is not None else None for a in samples]
    groups: list[tuple[object, int, str]] = []  # (value, count, text) with numerically equal answers merged
    for value, attempt in zip(values, samples):
        if value is None:
            continue
        for i, (v, count, text) in enumerate(groups):
            if same_number(v, value):
                groups[i] = (v, count + 1, text)
                break
        else:
            groups.append((value, 1, attempt.answer))
    votes = Counter({text: count for _, count, text in groups})
    if not groups:
        return Verdict(False, None, "vote", 0.0, label_free=True, votes={})
    _, count, text = max(groups, key=lambda g: g[1])
    agreement = count / len(samples)
    return Verdict(agreement >= config.min_agreement, text, "vote", agreement, label_free=True, votes=dict(votes))
