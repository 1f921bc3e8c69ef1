"""The reflector: after a failure, the model writes one general correction rule.

It may see the problem, its wrong reasoning and, for learning-split problems only, the
reference solution. It never sees the answer of an evaluation problem: the caller says
which split a problem belongs to, and an evaluation problem's solution is never passed on.
A guard rejects empty, overlong or answer-leaking rules and asks again, a bounded number of times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from agents.backend import GenerationBackend, Sampling
from agents.errors import SelfImproveError
from agents.guard import rule_problem
from agents.prompts import (
    REFLECT_EXAMPLE,
    REFLECT_PREVIOUS,
    REFLECT_REFERENCE,
    REFLECT_RETRY,
    REFLECT_SYSTEM,
    REFLECT_USER,
)

_RULE = re.compile(r"RULE:\s*(.+)", re.IGNORECASE | re.DOTALL)


class ReflectionError(SelfImproveError):
    """No acceptable rule after the allowed number of attempts."""


@dataclass
class ReflectorConfig:
    max_attempts: int = 3  # asks at most this many times before giving up
    max_chars: int = 300  # a rule longer than this is rejected
    max_sentences: int = 2  # a rule with more sentences is rejected
    max_new_tokens: int = 96  # generation cap for one rule
    retry_temperature: float = 0.7  # retries sample, so they can differ from the rejected rule

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_chars", "max_sentences", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.retry_temperature <= 0:
            raise ValueError(f"retry_temperature must be > 0, got {self.retry_temperature}")


@dataclass
class Reflection:
    rule: str
    attempts: int
    rejected: list[str] = field(default_factory=list)  # why earlier drafts were refused


def parse_rule(text: str) -> str:
    """The rule after 'RULE:', cut at the first blank line; '' if there is none."""
    match = _RULE.search(text)
    if not match:
        return ""
    return match.group(1).strip().split("\n\n")[0].replace("\n", " ").strip()


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()).rstrip(".") == " ".join(b.lower().split()).rstrip(".")


class Reflector:
    def __init__(self, backend: GenerationBackend, config: ReflectorConfig | None = None):
        self.backend = backend
        self.config = config or ReflectorConfig()

    def reflect(
        self,
        question: str,
        wrong_attempt: str,
        *,
        label: str | None,
        reference_solution: str | None = None,
        learning_split: bool,
        previous_rule: str | None = None,
        seed: int = 0,
    ) -> Reflection:
        """One guarded rule. ``label`` feeds only the leak guard; the model never sees it."""
        if reference_solution is not None and not learning_split:
            raise ValueError("an evaluation problem's reference solution must never reach the reflector")
        reference = REFLECT_REFERENCE.format(solution=reference_solution) if reference_solution else ""
        previous = REFLECT_PREVIOUS.format(rule=previous_rule) if previous_rule else ""
        user = REFLECT_USER.format(
            question=question, attempt=wrong_attempt, reference=reference, previous=previous, example=REFLECT_EXAMPLE
        )
        rejected: list[str] = []
        cfg = self.config
        for attempt in range(1, cfg.max_attempts + 1):
            request = user if not rejected else f"{user}\n\n{REFLECT_RETRY.format(reason=rejected[-1])}"
            sampling = Sampling() if attempt == 1 else Sampling(temperature=cfg.retry_temperature, seed=seed + attempt)
            (out,) = self.backend.generate(
                [self.backend.chat_prompt(REFLECT_SYSTEM, request)], max_new_tokens=cfg.max_new_tokens, sampling=sampling
            )
            rule = parse_rule(out.text)
            reason = (
                "it has no 'RULE:' line"
                if not rule
                else rule_problem(rule, label, cfg.max_chars, cfg.max_sentences, echoes=(REFLECT_SYSTEM, REFLECT_USER, REFLECT_EXAMPLE))
            )
            if reason is None and previous_rule and _same_text(rule, previous_rule):
                reason = "it repeats the earlier rule that did not fix the mistake"
            if reason is None:
                return Reflection(rule, attempt, rejected)
            rejected.append(reason)
        raise ReflectionError(f"no acceptable rule after {cfg.max_attempts} attempts: {'; '.join(rejected)}")
