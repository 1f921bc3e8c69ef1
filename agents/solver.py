"""The solver: chat-templated, step-by-step answers in a fixed 'The answer is N.' format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from agents.answers import extract_answer
from agents.lm.backend import GenerationBackend, ask_together
from agents.lm.generation import GREEDY, Ask, Generation, Request, Sampling
from agents.prompts import SOLVER_RULES_HEADER, SOLVER_SYSTEM, SOLVER_USER


@dataclass
class SolverConfig:
    max_new_tokens: int = 384  # a 256 cap cut 14 of 40 Qwen answers short here
    max_rules: int = 3  # rules from memory placed in the prompt, at most

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_rules < 0:
            raise ValueError(f"max_rules must be >= 0, got {self.max_rules}")


@dataclass
class Attempt:
    text: str  # the model's whole answer
    answer: str | None  # the extracted final number, as text; None if none was found
    strategy: str  # how it was extracted: boxed | answer_is | hash | last_number | none
    tokens: int  # tokens generated


class Solver:
    def __init__(self, backend: GenerationBackend, config: SolverConfig | None = None):
        self.backend = backend
        self.config = config or SolverConfig()

    def rules_in_prompt(self, rules: Sequence[str]) -> list[str]:
        """The rules a prompt carries, best first: the prompt's rule budget is applied here alone."""
        return list(rules)[: self.config.max_rules]

    def with_rule(self, remembered: Sequence[str], rule: str) -> list[str]:
        """Remembered rules with ``rule`` (the one under test) added last, within the rule budget (at least ``rule``)."""
        return [*list(remembered)[: max(1, self.config.max_rules) - 1], rule]

    def prompt(self, question: str, rules: Sequence[str] = ()) -> str:
        return self.backend.chat_prompt(SOLVER_SYSTEM, solver_turn(question, self.rules_in_prompt(rules)))

    def solve(
        self,
        questions: Sequence[str],
        rules: Sequence[Sequence[str]] | None = None,
        weights: torch.Tensor | None = None,
        sampling: Sampling = GREEDY,
    ) -> list[Attempt]:
        """Answer several questions in one batched call; rules[i] go into question i's prompt."""
        (attempts,) = ask_together(self.backend, [self.ask(questions, rules, weights, sampling)])
        return attempts

    def ask(
        self,
        questions: Sequence[str],
        rules: Sequence[Sequence[str]] | None = None,
        weights: torch.Tensor | None = None,
        sampling: Sampling = GREEDY,
    ) -> Ask[list[Attempt]]:
        """``solve`` as a request, for a backend call shared with other agents' requests."""
        rules = rules if rules is not None else [()] * len(questions)
        if len(rules) != len(questions):
            raise ValueError(f"got {len(rules)} rule lists for {len(questions)} questions")
        prompts = [self.prompt(q, r) for q, r in zip(questions, rules)]
        request = Request(tuple(prompts), weights, self.config.max_new_tokens, stop_at_answer=True, sampling=sampling)
        return Ask(request, _attempts)


def solver_turn(question: str, rules: Sequence[str] = ()) -> str:
    """The user turn of the solver's prompt: the rules (if any), then the problem."""
    header = SOLVER_RULES_HEADER.format(rules="\n".join(f"- {r}" for r in rules)) if rules else ""
    return SOLVER_USER.format(rules=header, question=question)


def _attempts(outputs: list[Generation]) -> list[Attempt]:
    attempts = []
    for out in outputs:
        extraction = extract_answer(out.text)
        answer = None if extraction.value is None else _plain(extraction.value)
        attempts.append(Attempt(out.text, answer, extraction.strategy, out.new_tokens))
    return attempts


def _plain(value) -> str:
    """A Fraction as the plain number a person would write: 18, 2.5, or 1/3."""
    if value.denominator == 1:
        return str(value.numerator)
    as_float = float(value)
    return f"{as_float:g}" if abs(as_float - round(as_float, 6)) < 1e-12 else f"{value.numerator}/{value.denominator}"
