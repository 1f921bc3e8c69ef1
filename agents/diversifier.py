"""The diversifier: variants of a problem that keep its quantities, so that its label still holds.

A paraphrase, and the same problem with other names and objects. A variant is kept only when
it holds exactly the same numbers as the original (as a multiset: none lost, none changed,
none added), which is what lets the original label verify the variant's solutions. The loop
solves kept variants with a validated rule in the prompt and trains on the verified solutions
with rule-free prompts (context distillation, Snell et al. 2022, arXiv 2209.15189).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from agents.guard import numbers_in
from agents.lm.backend import GenerationBackend, ask_together
from agents.lm.generation import Ask, Generation, Request, Sampling
from agents.prompts import VARIANT_KINDS, VARIANT_REQUEST, VARIANT_SYSTEM

_PROBLEM = re.compile(r"Problem:\s*(.+)", re.DOTALL | re.IGNORECASE)


@dataclass
class DiversifierConfig:
    kinds: tuple[str, ...] = VARIANT_KINDS  # which variants to ask for
    per_kind: int = 1  # variants asked for per kind
    max_new_tokens: int = 200  # generation cap per variant
    temperature: float = 0.7  # variants are sampled, so two of a kind can differ

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(VARIANT_KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {VARIANT_KINDS}, got {self.kinds}")
        for name in ("per_kind", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass
class Variants:
    kept: list[str]  # variant questions with the original's numbers
    refused: list[dict] = field(default_factory=list)  # {"kind", "text", "reason"}


def parse_variant(text: str) -> str:
    """The problem after 'Problem:' (or the whole text), cut at the first blank line."""
    match = _PROBLEM.search(text)
    body = (match.group(1) if match else text).strip()
    return body.split("\n\n")[0].strip()


def quantity_problem(original: str, variant: str) -> str | None:
    """Why a variant cannot keep the original's label, or None when its numbers are the same."""
    if not variant:
        return "it is empty"
    if " ".join(variant.lower().split()) == " ".join(original.lower().split()):
        return "it repeats the problem unchanged"
    want, got = Counter(numbers_in(original)), Counter(numbers_in(variant))
    if want != got:
        lost, added = sorted(map(str, (want - got).elements())), sorted(map(str, (got - want).elements()))
        return f"its numbers differ (lost {', '.join(lost) or 'none'}; added {', '.join(added) or 'none'})"
    return None


class Diversifier:
    def __init__(self, backend: GenerationBackend, config: DiversifierConfig | None = None):
        self.backend = backend
        self.config = config or DiversifierConfig()

    def variants(self, question: str, *, seed: int = 0) -> Variants:
        """Variants of the question, each checked to keep every quantity (one batched call)."""
        (made,) = ask_together(self.backend, [self.ask(question, seed=seed)])
        return made

    def ask(self, question: str, *, seed: int = 0) -> Ask[Variants]:
        """``variants`` as a request, for a backend call shared with other agents' requests."""
        cfg = self.config
        kinds = [k for k in cfg.kinds for _ in range(cfg.per_kind)]
        prompts = [self.backend.chat_prompt(VARIANT_SYSTEM, VARIANT_REQUEST[k].format(question=question)) for k in kinds]
        request = Request(tuple(prompts), max_new_tokens=cfg.max_new_tokens,
                          sampling=Sampling(temperature=cfg.temperature, seed=seed))

        def read(outputs: list[Generation]) -> Variants:
            kept, refused = [], []
            for kind, out in zip(kinds, outputs):
                text = parse_variant(out.text)
                reason = quantity_problem(question, text)
                if reason is None and text in kept:
                    reason = "it repeats another variant"
                if reason is None:
                    kept.append(text)
                else:
                    refused.append({"kind": kind, "text": text, "reason": reason})
            return Variants(kept, refused)

        return Ask(request, read)
