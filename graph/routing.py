"""Routing a question: the remembered rules its prompt carries and the expert mixture it is solved under.

The loop's nodes and the evaluation's arms route the same way: memory features and priors
for the questions, the rules retrieved for each (capped by the solver's rule budget), and
the router's reading of the prompts those rules make. Questions routed together share one
router call (their prompts are padded together), so a caller that routes one question at a
time gets that question's own call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from agents.solver import Solver
from graph.context import RunContext


@dataclass
class Route:
    rules: list[str]  # the remembered rules placed in the question's prompt
    rule_ids: list[str]  # their memory ids, in the same order
    probs: torch.Tensor | None  # (n_experts,) the router's dense probabilities; None without adapters
    weights: torch.Tensor | None  # (1, n_experts) the mixture the question is solved under; None: the bare model
    memory: torch.Tensor | None  # (1, feature_dim) the memory features the router read; None without memory


def route(ctx: RunContext, questions: list[str], *, exclude: Sequence[str | None] | None = None,
          with_rules: bool = True, with_adapters: bool = True, solver: Solver | None = None) -> list[Route]:
    """One Route per question, from one memory lookup and one router call for all of them.

    ``exclude``: per question, a problem whose memories it must not see (its own). ``solver``
    writes the prompts the router reads (default: the loop's).
    """
    solver = solver or ctx.solver
    memory, prior, rule_texts, rule_ids = ctx.memory_vectors(questions, exclude=exclude)
    rules = [solver.rules_in_prompt(texts) if with_rules else [] for texts in rule_texts]
    ids = [found[: len(used)] for found, used in zip(rule_ids, rules)]
    if not with_adapters:
        return [Route(r, i, None, None, None) for r, i in zip(rules, ids)]
    prompts = [solver.prompt(q, r) for q, r in zip(questions, rules)]
    probs, weights = ctx.routing(prompts, memory, prior)  # (batch, n_experts) each
    return [Route(rules[j], ids[j], probs[j], weights[j : j + 1], None if memory is None else memory[j : j + 1])
            for j in range(len(questions))]
