"""MemoryStore: rules and episodes in Chroma, the memory graph beside them, router features.

Two modes run the same code: embedded (``chromadb.PersistentClient`` in run_dir/memory/chroma,
one writer process guarded by a lock file) and server (``chromadb.HttpClient`` at
``MemoryConfig.url``, shared by loops on several machines). Embeddings are always computed
here and handed to Chroma, so Chroma never runs (or downloads) an embedding model itself.

This module holds the store's reading and writing API. Beside it, one idea each: ``base``
(StoreBase: the open store's state, closing, and the write discipline every method follows:
thread lock, io lock, dirty marker, autosave), ``opening`` (the three ways a store is opened
and the collection check), ``dedup`` (whether a new rule merges into a near-duplicate),
``graph_file`` (the graph JSON and its dirty marker), ``features`` (query answers to router
features) and ``chroma`` (similarity, error messages). It stays near 450 lines: each
public method is short, and splitting the API itself would scatter one class over modules.

Counters (retrieved, helped, hurt) are read-modify-write: with several loops writing to one
server, two increments of the same rule at the same moment can count once.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction

from memory_store.base import StoreBase
from memory_store.chroma import chroma_errors, similarity
from memory_store.config import MemoryConfig
from memory_store.dedup import plan_chunk
from memory_store.embedding import MiniLMEmbedding, embedder_dim
from memory_store.errors import BadFilterError, MemoryStoreError, UnknownIdError
from memory_store.features import features_from_hits
from memory_store.filters import and_filters, validate_where
from memory_store.graph import node_id
from memory_store.opening import open_store
from memory_store.records import (
    EPISODE_FILTER_KEYS,
    OUTCOMES,
    RULE_FILTER_KEYS,
    RULE_STATUSES,
    Episode,
    MemoryFeatures,
    MemoryStats,
    NewRule,
    Provenance,
    Rule,
    RuleHit,
    UpdateInfo,
    rule_id_for,
)

logger = logging.getLogger(__name__)

BATCH = 1000  # rows per Chroma add/update/query call, under every client's max batch size


class MemoryStore(StoreBase):
    """Use ``MemoryStore.open(config, embedder=..., writable=...)``; close it (or use ``with``)."""

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        config: MemoryConfig,
        embedder: EmbeddingFunction[Documents] | None = None,
        writable: bool = True,
    ) -> MemoryStore:
        """Open (creating if writable) the memory described by ``config``.

        ``embedder`` defaults to MiniLMEmbedding (all-MiniLM-L6-v2 from the offline package).
        Embedded and writable: takes the writer lock, WriterLockedError if another process has it.
        Embedded and read-only: reads a consistent snapshot taken now; later writes are not seen.
        """
        embedder = embedder if embedder is not None else MiniLMEmbedding()
        dim = embedder_dim(embedder)
        if dim != config.embed_dim:
            raise MemoryStoreError(
                f"embedder {embedder.name()} gives {dim}-d vectors but config.embed_dim is {config.embed_dim}"
            )
        return open_store(config, writable, functools.partial(cls, config, embedder))

    # -- reading rows ---------------------------------------------------------------------

    def _get_rules(self, rule_ids: Sequence[str]) -> dict[str, Rule]:
        rule_ids = list(rule_ids)
        out: dict[str, Rule] = {}
        for start in range(0, len(rule_ids), BATCH):
            with chroma_errors("get"):
                found = self._rules.get(ids=rule_ids[start : start + BATCH], include=["documents", "metadatas"])
            out.update(
                (i, Rule.from_chroma(d, m))
                for i, d, m in zip(found["ids"], found["documents"], found["metadatas"], strict=True)
            )
        return out

    def get_rule(self, rule_id: str) -> Rule:
        """The rule with this id; UnknownIdError if there is none."""
        self._require_open()
        rule = self._get_rules([rule_id]).get(rule_id)
        if rule is None:
            raise UnknownIdError(f"no rule with id {rule_id!r}")
        return rule

    def get_episode(self, episode_id: str) -> Episode:
        """The episode with this id; UnknownIdError if there is none."""
        self._require_open()
        with chroma_errors("get"):
            found = self._episodes.get(ids=[episode_id], include=["documents", "metadatas"])
        if not found["ids"]:
            raise UnknownIdError(f"no episode with id {episode_id!r}")
        return Episode.from_chroma(found["documents"][0], found["metadatas"][0])

    # -- rules ----------------------------------------------------------------------------

    def add_rule(
        self,
        text: str,
        *,
        problem_id: str,
        expert: int | None = None,
        cycle: int = 0,
        episode_id: str | None = None,
        embedding: Any | None = None,
    ) -> tuple[str, bool]:
        """Store a rule, or merge it into a near-duplicate. Returns (rule_id, merged).

        Same normalised text, or cosine >= dedup_threshold to a stored rule, counts as a
        duplicate: the stored rule keeps its text and records this source in ``merged_from``.
        ``embedding`` (embed_dim,) skips the embedder.
        """
        new = NewRule(text=text, problem_id=problem_id, expert=expert, cycle=cycle, episode_id=episode_id)
        return self.add_rules([new], embeddings=None if embedding is None else [embedding])[0]

    def add_rules(self, rules: Sequence[NewRule], embeddings: Any | None = None) -> list[tuple[str, bool]]:
        """Batch ``add_rule``: one embedder call, then one lookup, query and write per 1000 rules.

        Duplicates inside the batch merge into the first of them. ``embeddings`` (n, embed_dim).
        """
        if not rules:
            return []
        for rule in rules:
            self._check_new_rule(rule)
        texts = [rule.text.strip() for rule in rules]
        matrix = self._embed(texts, embeddings)  # (n, embed_dim)
        results: list[tuple[str, bool]] = []
        with self._writing("add rules"):
            for start in range(0, len(rules), BATCH):
                stop = start + BATCH
                results += self._add_chunk(rules[start:stop], texts[start:stop], matrix[start:stop])
        return results

    def _add_chunk(self, rules: Sequence[NewRule], texts: list[str], matrix: np.ndarray) -> list[tuple[str, bool]]:
        """add_rules for at most BATCH rules; earlier chunks are already in Chroma."""
        now = time.time()
        ids = [rule_id_for(text) for text in texts]
        existing = self._get_rules(sorted(set(ids)))
        nearest = self._rules.query(query_embeddings=matrix, n_results=1, include=["distances"])

        def fetch(rule_id: str) -> Rule:
            return self._get_rules([rule_id])[rule_id]

        plan = plan_chunk(rules, texts, ids, matrix, nearest, existing, fetch, self.config.dedup_threshold, now)
        fresh, touched = plan.fresh, plan.touched
        if fresh:
            self._rules.add(
                ids=[rule.rule_id for _, rule in fresh],
                embeddings=matrix[[row for row, _ in fresh]],
                documents=[rule.text for _, rule in fresh],
                metadatas=[rule.to_metadata() for _, rule in fresh],
            )
        if touched:
            self._rules.update(ids=list(touched), metadatas=[rule.to_metadata() for rule in touched.values()])
        for rule in [r for _, r in fresh] + list(touched.values()):
            self.graph.add_rule(rule)
        return plan.results

    def _check_new_rule(self, rule: NewRule) -> None:
        if not rule.text.strip():
            raise MemoryStoreError("rule text is empty")
        if not rule.problem_id:
            raise MemoryStoreError("a rule needs the problem_id it came from")
        self._check_expert(rule.expert)

    def _check_expert(self, expert: int | None) -> None:
        if expert is not None and not 0 <= expert < self.config.n_experts:
            raise MemoryStoreError(f"expert must be in [0, {self.config.n_experts}), got {expert}")

    def _update_rule(self, rule_id: str, what: str, change: Callable[[Rule], dict[str, Any]]) -> Rule:
        with self._writing(what):
            rule = self._get_rules([rule_id]).get(rule_id)
            if rule is None:
                raise UnknownIdError(f"no rule with id {rule_id!r}")
            rule = rule.model_copy(update={**change(rule), "updated_at": time.time()})
            self._rules.update(ids=[rule_id], metadatas=[rule.to_metadata()])
            self.graph.add_rule(rule)
            return rule

    def record_outcome(self, rule_id: str, helped: bool, *, episode_id: str | None = None) -> Rule:
        """Count one outcome of a rule: helped (True) or hurt (False); once per ``episode_id`` when given."""
        key = "helped" if helped else "hurt"
        mark = f"outcome:{episode_id}"

        def change(rule: Rule) -> dict:
            if episode_id is not None and mark in rule.counted:
                return {}  # this episode's outcome is already counted
            return {key: getattr(rule, key) + 1, "counted": rule.counted + ([mark] if episode_id is not None else [])}

        return self._update_rule(rule_id, "record an outcome", change)

    def record_retrieved(self, rule_ids: Sequence[str], *, episode_id: str | None = None) -> None:
        """Count that these rules were offered to the solver (memory_features does not count); once per episode."""
        with self._writing("record retrievals"):
            rules = self._get_rules(list(dict.fromkeys(rule_ids)))
            missing = [i for i in rule_ids if i not in rules]
            if missing:
                raise UnknownIdError(f"no rule with id {missing[0]!r}")
            now = time.time()
            counts = Counter(rule_ids)
            mark = f"retrieved:{episode_id}"
            updated = [
                r.model_copy(update={"retrieved": r.retrieved + counts[i], "updated_at": now,
                                     "counted": r.counted + ([mark] if episode_id is not None else [])})
                for i, r in rules.items() if episode_id is None or mark not in r.counted
            ]
            if updated:
                self._rules.update(ids=[r.rule_id for r in updated], metadatas=[r.to_metadata() for r in updated])

    def set_status(self, rule_id: str, status: str) -> Rule:
        """Set a rule's status: one of RULE_STATUSES."""
        if status not in RULE_STATUSES:
            raise MemoryStoreError(f"unknown rule status {status!r}; allowed: {', '.join(RULE_STATUSES)}")
        return self._update_rule(rule_id, "set a status", lambda r: {"status": status})

    def record_validation(self, rule_id: str, *, validated: bool, share_with: float, share_without: float) -> Rule:
        """A rule's test by effect: the verified shares with and without it; refuted rules leave every prompt."""
        def change(rule: Rule) -> dict:
            shares = {"share_with": float(share_with), "share_without": float(share_without)}
            if not validated:
                return {**shares, "status": "refuted"}
            return {**shares, "status": "new"} if rule.status == "refuted" else shares  # helped this time

        return self._update_rule(rule_id, "record a validation", change)

    def record_training(self, rule_id: str, *, expert: int, update_id: str, prompts: Sequence[str] = ()) -> Rule:
        """Mark a rule trained into ``expert`` by update ``update_id`` from these prompts."""
        self._check_expert(expert)
        if not update_id:
            raise MemoryStoreError("record_training needs a non-empty update_id")
        change = {"expert": expert, "update_id": update_id, "prompts": list(prompts), "status": "trained"}
        return self._update_rule(rule_id, "record training", lambda r: change)

    def list_rules(
        self,
        *,
        expert: int | None = None,
        status: str | None = None,
        outcome: str | None = None,
        where: dict[str, Any] | None = None,
        limit: int | None = None,
        newest_first: bool = False,
    ) -> list[Rule]:
        """Rules ordered by creation time, filtered by expert, status, outcome and a where-filter.

        ``where`` uses Chroma's syntax over RULE_FILTER_KEYS, e.g. {"cycle": {"$gte": 2}}.
        """
        self._require_open()
        if status is not None and status not in RULE_STATUSES:
            raise BadFilterError(f"unknown rule status {status!r}; allowed: {', '.join(RULE_STATUSES)}")
        if outcome is not None and outcome not in OUTCOMES:
            raise BadFilterError(f"unknown outcome {outcome!r}; allowed: {', '.join(OUTCOMES)}")
        if limit is not None and limit < 1:
            raise BadFilterError(f"limit must be >= 1, got {limit}")
        self._check_expert(expert)
        typed = {k: v for k, v in (("expert", expert), ("status", status)) if v is not None}
        combined = and_filters(validate_where(typed, RULE_FILTER_KEYS), validate_where(where, RULE_FILTER_KEYS))
        rules = [r for r in self._iter_rules(combined) if outcome is None or r.outcome == outcome]
        rules.sort(key=lambda r: (r.created_at, r.rule_id), reverse=newest_first)
        return rules[:limit] if limit is not None else rules

    def search_rules(
        self, text: str, k: int = 5, *, where: dict[str, Any] | None = None, embedding: Any | None = None
    ) -> list[RuleHit]:
        """The k rules most similar to ``text``, best first, optionally filtered."""
        self._require_open()
        if k < 1:
            raise BadFilterError(f"k must be >= 1, got {k}")
        checked = validate_where(where, RULE_FILTER_KEYS)
        vector = self._embed([text], None if embedding is None else [embedding])
        with chroma_errors("query"):
            found = self._rules.query(
                query_embeddings=vector, n_results=k, where=checked, include=["documents", "metadatas", "distances"]
            )
        return [
            RuleHit(rule=Rule.from_chroma(d, m), similarity=similarity(dist))
            for d, m, dist in zip(found["documents"][0], found["metadatas"][0], found["distances"][0], strict=True)
        ]

    def show_rule(self, rule_id: str) -> Provenance:
        """The rule's provenance: problem -> failure -> rule -> prompts -> update -> outcome."""
        with self._lock:
            return self._provenance(self.get_rule(rule_id))

    def _provenance(self, rule: Rule) -> Provenance:
        failure = None
        if rule.episode_id:
            try:
                failure = self.get_episode(rule.episode_id)
            except UnknownIdError:
                logger.info("rule %s names episode %s, which is not stored", rule.rule_id, rule.episode_id)
        problem_text = failure.problem_text if failure else None
        if problem_text is None:
            same_problem = self.list_episodes(problem_id=rule.problem_id)
            problem_text = same_problem[0].problem_text if same_problem else None
        update = None
        if rule.update_id:
            update = UpdateInfo(
                update_id=rule.update_id,
                expert=self.graph.nx_graph.nodes.get(node_id("update", rule.update_id), {}).get("expert", rule.expert),
                rule_ids=self.graph.rules_in_update(rule.update_id),
                fixed=self.graph.fixed_by(rule.update_id),
                broke=self.graph.broke_by(rule.update_id),
            )
        return Provenance(
            problem_id=rule.problem_id,
            problem_text=problem_text,
            failure=failure,
            rule=rule,
            prompts=rule.prompts,
            update=update,
            outcome=rule.outcome,
        )

    # -- episodes -------------------------------------------------------------------------

    def add_episode(self, episode: Episode, *, embedding: Any | None = None) -> str:
        """Store an episode, or replace the one with the same id (keeping its creation time).

        Finds similar problems among stored episodes (cosine >= similar_threshold) for the
        graph's similar_to edges. Its rule_ids must name stored rules. Returns the episode id.
        """
        if episode.expert_weights and len(episode.expert_weights) != self.config.n_experts:
            raise MemoryStoreError(
                f"episode {episode.episode_id} has {len(episode.expert_weights)} expert weights, "
                f"the store has n_experts={self.config.n_experts}"
            )
        vector = self._embed([episode.problem_text], None if embedding is None else [embedding])
        with self._writing("add an episode"):
            missing = set(episode.rule_ids) - set(self._get_rules(episode.rule_ids))
            if missing:
                raise UnknownIdError(f"episode {episode.episode_id} names unknown rule {sorted(missing)[0]!r}")
            old = self._episodes.get(ids=[episode.episode_id], include=["metadatas"])
            old_meta = old["metadatas"][0] if old["ids"] else {}
            now = time.time()
            # Keep what an earlier version found: similar_to edges only grow, so the graph
            # rebuilt from metadata equals the one built write by write.
            similar = set(json.loads(old_meta.get("similar_problems", "[]")))
            found = self._episodes.query(
                query_embeddings=vector, n_results=self.config.k + 1, include=["metadatas", "distances"]
            )
            for meta, dist in zip(found["metadatas"][0], found["distances"][0], strict=True):
                if meta["problem_id"] != episode.problem_id and similarity(dist) >= self.config.similar_threshold:
                    similar.add(meta["problem_id"])
            stored = episode.model_copy(
                update={
                    "similar_problems": sorted(similar),
                    "created_at": old_meta.get("created_at", now),
                    "updated_at": now,
                }
            )
            self._episodes.upsert(
                ids=[stored.episode_id],
                embeddings=vector,
                documents=[stored.problem_text],
                metadatas=[stored.to_metadata()],
            )
            self.graph.add_episode(stored)
        return stored.episode_id

    def list_episodes(
        self,
        *,
        problem_id: str | None = None,
        split: str | None = None,
        where: dict[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[Episode]:
        """Episodes ordered by creation time, filtered by problem, split and a where-filter."""
        self._require_open()
        typed = {k: v for k, v in (("problem_id", problem_id), ("split", split)) if v is not None}
        combined = and_filters(validate_where(typed, EPISODE_FILTER_KEYS), validate_where(where, EPISODE_FILTER_KEYS))
        episodes = sorted(self._iter_episodes(combined), key=lambda e: (e.created_at or 0.0, e.episode_id))
        return episodes[:limit] if limit is not None else episodes

    # -- what the memory gives the router -------------------------------------------------

    def memory_features(self, question: str, *, embedding: Any | None = None,
                        exclude_problem: str | None = None) -> MemoryFeatures:
        """Router features, expert prior and top rules from the question's nearest memories.

        Read-only (it does not count retrievals: call record_retrieved for rules you use), so
        router training and inference see the same function. Vector size: config.feature_dim.
        ``exclude_problem``: leave out that problem's own episodes and rules (an episode never
        sees what it wrote itself, also when it reruns after a kill).
        """
        self._require_open()
        vector = self._embed([question], None if embedding is None else [embedding])  # (1, embed_dim)
        k = self.config.k
        include = ["documents", "metadatas", "distances", "embeddings"]
        with chroma_errors("query"):
            # Inactive rules are dropped after an unfiltered search; 2k candidates leave room.
            rule_hits = self._rules.query(query_embeddings=vector, n_results=2 * k, include=include)
            episode_hits = self._episodes.query(query_embeddings=vector, n_results=2 * k, include=include)
        return features_from_hits(self.config, rule_hits, episode_hits, exclude_problem)

    def stats(self) -> MemoryStats:
        """Counts over the whole memory (reads every rule's metadata)."""
        self._require_open()
        with self._lock:
            return self._stats()

    def _stats(self) -> MemoryStats:
        rules = list(self._iter_rules())
        with chroma_errors("count"):
            n_episodes = self._episodes.count()
        return MemoryStats(
            mode=self.mode,
            writable=self.writable,
            n_rules=len(rules),
            n_episodes=n_episodes,
            n_problems=self.graph.count_nodes()["problem"],
            rules_by_status=dict(Counter(r.status for r in rules)),
            rules_by_expert=dict(Counter(r.expert for r in rules if r.expert is not None)),
            rules_by_outcome=dict(Counter(r.outcome for r in rules)),
            retrieved=sum(r.retrieved for r in rules),
            helped=sum(r.helped for r in rules),
            hurt=sum(r.hurt for r in rules),
            graph_nodes=self.graph.nx_graph.number_of_nodes(),
            graph_edges=self.graph.nx_graph.number_of_edges(),
        )


__all__ = ["MemoryStore"]
