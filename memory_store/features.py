"""Router memory features from a question's nearest past episodes and rules.

The store queries Chroma for the neighbours; this module picks them from the answers and turns
them into numbers, so the same function serves router training and inference
(``MemoryStore.memory_features`` is the only caller). Layout and meaning are documented on
``records.MemoryFeatures``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memory_store import chroma
from memory_store.config import MemoryConfig
from memory_store.records import ACTIVE_STATUSES, Episode, MemoryFeatures, Rule


@dataclass(frozen=True)
class Neighbour:
    embedding: np.ndarray  # (embed_dim,)
    similarity: float  # cosine similarity to the question, clipped to [0, 1]
    usage: np.ndarray | None  # (n_experts,) summing to 1; None when its experts are unknown
    success: float  # in [0, 1]: how far its experts count as having helped


def episode_neighbour(episode: Episode, embedding: np.ndarray, similarity: float, n_experts: int) -> Neighbour:
    """Usage: the episode's router weights; success: 1 if its latest verdict is correct."""
    weights = np.asarray(episode.expert_weights, dtype=np.float64)  # (n_experts,) or (0,)
    usage = weights / weights.sum() if weights.shape == (n_experts,) and weights.sum() > 0 else None
    return Neighbour(np.asarray(embedding, dtype=np.float64), similarity, usage, 1.0 if episode.solved else 0.0)


def rule_neighbour(rule: Rule, embedding: np.ndarray, similarity: float, n_experts: int) -> Neighbour:
    """Usage: one-hot of the rule's expert; success: the share of its outcomes that helped."""
    usage = None
    if rule.expert is not None and 0 <= rule.expert < n_experts:
        usage = np.zeros(n_experts)
        usage[rule.expert] = 1.0
    judged = rule.helped + rule.hurt
    success = rule.helped / judged if judged else 0.0
    return Neighbour(np.asarray(embedding, dtype=np.float64), similarity, usage, success)


def compute_features(
    config: MemoryConfig,
    neighbours: list[Neighbour],
    top_rules: list[tuple[Rule, float]],
    episode_ids: list[str],
) -> MemoryFeatures:
    """Similarity-weighted mean embedding + usage histogram, and the smoothed expert prior.

    prior[e] = (c[e] + a) / (sum(c) + n_experts * a), with c[e] = sum over neighbours of
    similarity * success * usage[e] and a = prior_smoothing (additive smoothing; no history
    gives the uniform prior).
    """
    n = config.n_experts
    mean = np.zeros(config.embed_dim)  # (embed_dim,)
    histogram = np.zeros(n)  # (n_experts,)
    counts = np.zeros(n)  # (n_experts,)
    total_sim = sum(nb.similarity for nb in neighbours)
    if total_sim > 0:
        mean = sum(nb.similarity * nb.embedding for nb in neighbours) / total_sim
    used = [nb for nb in neighbours if nb.usage is not None]
    used_sim = sum(nb.similarity for nb in used)
    if used_sim > 0:
        histogram = sum(nb.similarity * nb.usage for nb in used) / used_sim
        counts = sum(nb.similarity * nb.success * nb.usage for nb in used)
    alpha = config.prior_smoothing
    prior = (counts + alpha) / (counts.sum() + n * alpha)  # (n_experts,)
    vector = np.concatenate([mean, histogram]).astype(np.float32)  # (embed_dim + n_experts,)
    active = [(rule, sim) for rule, sim in top_rules if rule.status in ACTIVE_STATUSES][: config.n_rules]
    return MemoryFeatures(
        vector=vector,
        prior=prior.astype(np.float32),
        rules=[rule.text for rule, _ in active],
        rule_ids=[rule.rule_id for rule, _ in active],
        episode_ids=list(episode_ids),
    )


def empty_features(config: MemoryConfig) -> MemoryFeatures:
    """No history: a zero vector and the uniform prior."""
    return MemoryFeatures(
        vector=np.zeros(config.feature_dim, dtype=np.float32),
        prior=np.full(config.n_experts, 1.0 / config.n_experts, dtype=np.float32),
    )


def features_from_hits(
    config: MemoryConfig, rule_hits: dict, episode_hits: dict, exclude_problem: str | None
) -> MemoryFeatures:
    """Features from Chroma's answers to one question (2k candidates each, with embeddings).

    Keeps the k nearest episodes and the k nearest active rules, leaving out ``exclude_problem``'s own.
    """
    k = config.k
    n = config.n_experts
    neighbours = []
    episode_ids = []
    for doc, meta, dist, emb in _rows(episode_hits):
        episode = Episode.from_chroma(doc, meta)
        if episode.problem_id == exclude_problem or len(episode_ids) == k:
            continue
        neighbours.append(episode_neighbour(episode, emb, chroma.similarity(dist), n))
        episode_ids.append(episode.episode_id)
    top_rules = []
    for doc, meta, dist, emb in _rows(rule_hits):
        if meta["status"] not in ACTIVE_STATUSES or len(top_rules) == k or meta["problem_id"] == exclude_problem:
            continue
        rule = Rule.from_chroma(doc, meta)
        neighbours.append(rule_neighbour(rule, emb, chroma.similarity(dist), n))
        top_rules.append((rule, chroma.similarity(dist)))
    if not neighbours:
        return empty_features(config)
    return compute_features(config, neighbours, top_rules, episode_ids)


def _rows(hits: dict):
    """(document, metadata, distance, embedding) of each hit of a one-query Chroma result."""
    return zip(hits["documents"][0], hits["metadatas"][0], hits["distances"][0], hits["embeddings"][0], strict=True)
