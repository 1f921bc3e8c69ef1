"""Verified trajectories: which sampled solutions count as verified, and how they become training texts.

Rejection-sampling fine-tuning and STaR (Yuan et al. 2023, arXiv 2308.01825; Zelikman et al.
2022, arXiv 2203.14465) train only on the model's own solutions that reach the right answer,
and the gain grows with the number of *distinct* correct paths. A solution counts when its
final number equals the target (the label, or label-free the majority's pseudo-label), it
ends with an answer line of its own (not a stray last number), it did not hit the token cap,
and its worked steps hold (agents/worked_steps.py: a right answer reached by false arithmetic,
or by quoting made-up program output, is not a verified trajectory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from agents.answers import parse_number, same_number, steps_before_answer
from agents.solver import Attempt
from agents.worked_steps import unsound_reason

ANSWER_LINE_STRATEGIES = ("answer_is", "boxed", "hash")  # an explicit final answer, not a stray last number
SOURCES = ("own_sample", "rule_conditioned", "variant", "rationalization")  # where a training text came from


def chosen_sources(sources) -> tuple[str, ...]:
    """A non-empty subset of SOURCES in their canonical order; ValueError naming what is wrong."""
    sources = (sources,) if isinstance(sources, str) else tuple(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"training sources must be a non-empty subset of {', '.join(SOURCES)}; "
                         f"got {', '.join(sources) or 'none'}")
    return tuple(s for s in SOURCES if s in sources)



@dataclass(frozen=True)
class Text:
    """One training text: the solver's rule-free prompt for a question, and a verified solution."""

    question: str
    completion: str
    source: str  # one of SOURCES

    def to_dict(self) -> dict:
        return {"question": self.question, "completion": self.completion, "source": self.source}


def matches(attempt: Attempt, target: str | None) -> bool:
    """Whether the attempt's final number equals the target's."""
    return target is not None and attempt.answer is not None and same_number(
        parse_number(attempt.answer), parse_number(target))


def usable(attempt: Attempt, max_new_tokens: int) -> bool:
    """Ends with an answer line of its own and stopped before the token cap."""
    return attempt.strategy in ANSWER_LINE_STRATEGIES and attempt.tokens < max_new_tokens


def verified_share(attempts: Sequence[Attempt], target: str | None) -> float:
    """The share of attempts whose final number equals the target."""
    return sum(matches(a, target) for a in attempts) / len(attempts) if attempts else 0.0


def as_completion(text: str, answer: str) -> str:
    """The solution with its final line in the solver's format, 'The answer is N.', whatever form it used.

    Everything from the last line holding an answer marker ('The answer is', '####', '\\boxed')
    on is replaced; a solution without one gets the line appended.
    """
    body = steps_before_answer(text)
    value = parse_number(answer)
    shown = answer if value is None else (str(value.numerator) if value.denominator == 1 else answer)
    return f"{body}\nThe answer is {shown}.".lstrip()


def distinct(texts: Sequence[Text]) -> list[Text]:
    """Texts with the same question and the same completion (up to spacing and case) once, first kept."""
    seen, out = set(), []
    for text in texts:
        key = (text.question, " ".join(text.completion.lower().split()))
        if key not in seen:
            seen.add(key)
            out.append(text)
    return out


@dataclass(frozen=True)
class Verified:
    """What a batch of attempts yields: training texts, and the right answers refused for unsound steps."""

    texts: list[Text]
    unsound: list[dict]  # {"source", "reason"} per refused distinct solution


def verified_texts(question: str, attempts: Sequence[Attempt], target: str | None, max_new_tokens: int,
                   source: str) -> Verified:
    """The distinct usable attempts that reach the target with sound steps, as training texts of ``source``."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    # Judged on the steps as the model wrote them: the completion's normalised answer line drops
    # a step written on the model's own answer line ("So 5 + 10 = \\boxed{15} apples").
    judged = [(Text(question, as_completion(a.text, a.answer), source), unsound_reason(a.text, target))
              for a in attempts if matches(a, target) and usable(a, max_new_tokens)]
    reason = {id(text): why for text, why in judged}  # distinct() keeps the first of equal texts
    kept = distinct([text for text, why in judged if why is None])
    refused = distinct([text for text, why in judged if why is not None])
    return Verified(kept, [{"source": source, "reason": reason[id(text)]} for text in refused])
