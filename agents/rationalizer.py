"""Rationalization (STaR, Zelikman et al. 2022, arXiv 2203.14465): the answer as a hint, the model's own solution.

Used only on learning-split problems with a label, when no rule validated. The hint appears
in the generation prompt alone: a verified solution is trained with the solver's plain
prompt, so the model learns to reach the answer without being told it.
"""

from __future__ import annotations

from typing import Sequence

from agents.lm.generation import Ask, Sampling
from agents.prompts import RATIONALIZE_HINT
from agents.solver import Attempt, Solver


def ask_rationalizations(solver: Solver, question: str, label: str, samples: int, temperature: float, seed: int,
                         weights=None) -> Ask[list[Attempt]]:
    """A request for ``samples`` solutions written with the answer as a hint."""
    hinted = question + RATIONALIZE_HINT.format(label=label)
    sampling = Sampling(temperature=temperature, seed=seed)
    return solver.ask([hinted] * samples, [()] * samples, weights=weights, sampling=sampling)


def hint_free(prompts: Sequence[str], label: str) -> bool:
    """True when no prompt carries the rationalization hint for this label (a check for tests and the node)."""
    hint = RATIONALIZE_HINT.format(label=label).strip()
    return not any(hint in p for p in prompts)
