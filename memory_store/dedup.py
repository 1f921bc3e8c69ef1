"""The dedup decision: is a new rule new, or does it merge into a near-duplicate?

A new rule is a duplicate when its normalised text (so its id) is already stored, when the
nearest stored rule has cosine similarity >= ``MemoryConfig.dedup_threshold``, or when a rule
earlier in the same chunk does. The rule it merges into keeps its text, expert and id and
records the newcomer as a RuleSource in ``merged_from`` (once per problem, episode and text).

Kept apart from the store so the rule reads as one function over plain inputs: the store
reads Chroma before (stored rules by id, each row's nearest stored rule) and writes after.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memory_store.chroma import similarity
from memory_store.records import NewRule, Rule, RuleSource

logger = logging.getLogger(__name__)


@dataclass
class ChunkPlan:
    fresh: list[tuple[int, Rule]]  # (row in the chunk's matrix, rule) for rules new to the store
    touched: dict[str, Rule]  # stored rules that absorb a duplicate: update their metadata
    results: list[tuple[str, bool]]  # (rule_id, merged) per new rule, in input order


def plan_chunk(
    rules: Sequence[NewRule],
    texts: list[str],
    ids: list[str],
    matrix: np.ndarray,
    nearest: dict[str, Any],
    existing: dict[str, Rule],
    fetch: Callable[[str], Rule],
    threshold: float,
    now: float,
) -> ChunkPlan:
    """Decide each rule of one chunk, in order; earlier chunks are already stored.

    ``matrix`` (m, embed_dim) holds the rules' embeddings; ``nearest`` is Chroma's query
    answer for them (n_results=1, distances); ``existing`` maps the stored rules with these
    ids and grows as rules are fetched (``fetch`` reads one stored rule) or made here.
    """
    unit = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # (m, embed_dim)
    batch_sims = unit @ unit.T  # (m, m) cosine within the chunk
    fresh: list[tuple[int, Rule]] = []
    touched: dict[str, Rule] = {}
    results: list[tuple[str, bool]] = []
    for row, (rule_in, text, rule_id) in enumerate(zip(rules, texts, ids, strict=True)):
        target = existing.get(rule_id)
        if target is None and nearest["ids"][row]:
            if similarity(nearest["distances"][row][0]) >= threshold:
                target_id = nearest["ids"][row][0]
                target = existing.get(target_id) or fetch(target_id)
                existing[target_id] = target
        if target is None and fresh:
            sims = batch_sims[row, [r for r, _ in fresh]]  # (len(fresh),)
            best = int(np.argmax(sims))
            if sims[best] >= threshold:
                target = fresh[best][1]
        if target is None:
            stored = Rule(
                rule_id=rule_id,
                text=text,
                problem_id=rule_in.problem_id,
                episode_id=rule_in.episode_id,
                expert=rule_in.expert,
                cycle=rule_in.cycle,
                created_at=now,
                updated_at=now,
            )
            fresh.append((row, stored))
            existing[rule_id] = stored
            results.append((rule_id, False))
            continue
        if rule_in.expert is not None and rule_in.expert != target.expert:
            logger.info(
                "rule from %s merged into %s keeps expert %s, not %s",
                rule_in.problem_id,
                target.rule_id,
                target.expert,
                rule_in.expert,
            )
        source = RuleSource(
            problem_id=rule_in.problem_id, episode_id=rule_in.episode_id, cycle=rule_in.cycle, text=text, at=now
        )
        known = {(s.problem_id, s.episode_id, s.text) for s in target.merged_from}
        known.add((target.problem_id, target.episode_id, target.text))
        if (source.problem_id, source.episode_id, source.text) not in known:
            target.merged_from.append(source)
            target.updated_at = now
            if not any(rule is target for _, rule in fresh):  # fresh rules go in with add()
                touched[target.rule_id] = target
        results.append((target.rule_id, True))
    return ChunkPlan(fresh=fresh, touched=touched, results=results)
