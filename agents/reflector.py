"""The reflector: after a failure, the model compares its wrong attempt with a verified solution and writes one rule.

The verified solution is one of the model's own samples that reached the target, or, for
learning-split problems only, the reference solution. An evaluation problem's solution never
reaches the reflector: the caller says which split a problem belongs to. A guard refuses
empty, overlong, answer-leaking or instruction-echoing rules. Whether a rule is *kept* is
not decided here: the loop validates each accepted rule by its effect (graph/nodes.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agents.guard import rule_problem
from agents.lm.backend import GenerationBackend, ask_together
from agents.lm.generation import Ask, Generation, Request, Sampling
from agents.prompts import REFLECT_PREVIOUS, REFLECT_SYSTEM, REFLECT_USER

_RULE = re.compile(r"RULE:\s*(.+)", re.IGNORECASE | re.DOTALL)


@dataclass
class ReflectorConfig:
    max_attempts: int = 3  # rule candidates per cycle, written in one batched call
    max_chars: int = 300  # a rule longer than this is refused
    max_sentences: int = 2  # a rule with more sentences is refused
    max_new_tokens: int = 96  # generation cap for one rule
    temperature: float = 0.7  # candidates are sampled, so that they differ

    def __post_init__(self) -> None:
        for name in ("max_attempts", "max_chars", "max_sentences", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Candidate:
    text: str  # the rule as written ('' when the output had no 'RULE:' line)
    refused: str | None  # why the guard refused it; None = passed the guard


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

    def propose(self, *args, **kwargs) -> list[Candidate]:
        """``max_attempts`` rule candidates from one batched call (sampled, so they differ), each checked by the guard.

        Takes ``ask``'s arguments: the question, the wrong attempt, the verified solution, and
        keywords ``label`` (feeds only the leak guard; the model never sees it), ``tried``
        (rules already proposed for this problem: the model is asked for a different one, and
        a repeat of those or of an earlier candidate of this call is refused) and ``seed``.
        """
        (candidates,) = ask_together(self.backend, [self.ask(*args, **kwargs)])
        return candidates

    def ask(
        self,
        question: str,
        wrong_attempt: str,
        verified_solution: str,
        *,
        label: str | None,
        tried: list[str],
        seed: int = 0,
    ) -> Ask[list[Candidate]]:
        """``propose`` as a request, for a backend call shared with other agents' requests."""
        cfg = self.config
        previous = REFLECT_PREVIOUS.format(rules="\n".join(f"- {r}" for r in tried)) if tried else ""
        user = REFLECT_USER.format(question=question, attempt=wrong_attempt, verified=verified_solution,
                                   previous=previous)
        prompt = self.backend.chat_prompt(REFLECT_SYSTEM, user)
        request = Request((prompt,) * cfg.max_attempts, max_new_tokens=cfg.max_new_tokens,
                          sampling=Sampling(temperature=cfg.temperature, seed=seed))

        def read(outputs: list[Generation]) -> list[Candidate]:
            seen = list(tried)
            candidates = []
            for out in outputs:
                rule = parse_rule(out.text)
                if not rule:
                    candidates.append(Candidate("", "it has no 'RULE:' line"))
                    continue
                reason = rule_problem(rule, label, cfg.max_chars, cfg.max_sentences,
                                      echoes=(REFLECT_SYSTEM, REFLECT_USER))
                if reason is None and any(_same_text(rule, t) for t in seen):
                    reason = "it repeats a rule already tried on this problem"
                candidates.append(Candidate(rule, reason))
                seen.append(rule)
            return candidates

        return Ask(request, read)
