"""Plain records the memory stores and returns, and their mapping to Chroma metadata.

Chroma metadata holds only scalars, so list fields travel as JSON strings and a ``None``
field is left out (a missing key never matches a where-filter, which is what ``None`` means).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator, model_validator

# new: validated (or not yet tested) and not trained; refuted: did not help in context, never
# offered to a prompt or trained; rolled_back: its update was undone.
RuleStatus = Literal["new", "trained", "rolled_back", "retired", "refuted"]
# new: stored, not trained yet; trained: in an expert; rolled_back: its update was undone
# (canary failed); retired: kept for history, no longer offered.
RULE_STATUSES: tuple[str, ...] = ("new", "trained", "rolled_back", "retired", "refuted")
ACTIVE_STATUSES: tuple[str, ...] = ("new", "trained")  # the ones memory_features offers
OUTCOMES: tuple[str, ...] = ("helped", "hurt", "even", "untested")

ID_HEX_CHARS = 16  # 64 bits of sha256: collisions stay negligible far beyond a million rules


def normalise_text(text: str) -> str:
    """Lower case, single spaces: two rules that differ only in spacing or case are one rule."""
    return " ".join(text.lower().split())


def stable_id(prefix: str, *parts: str) -> str:
    """A process-independent id: sha256 of the parts (never Python's salted hash())."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return f"{prefix}-{digest[:ID_HEX_CHARS]}"


def rule_id_for(text: str) -> str:
    return stable_id("r", normalise_text(text))


def episode_id_for(problem_id: str, split: str, cycle: int, update_id: str | None) -> str:
    return stable_id("e", problem_id, split, str(cycle), update_id or "")


class RuleSource(BaseModel):
    """Where a near-duplicate that was merged into a rule came from."""

    problem_id: str
    episode_id: str | None = None
    cycle: int = 0
    text: str = ""  # the merged wording, kept for provenance
    at: float = 0.0  # unix time of the merge


class NewRule(BaseModel):
    """One rule to add with ``MemoryStore.add_rules``."""

    text: str
    problem_id: str
    expert: int | None = None
    cycle: int = 0
    episode_id: str | None = None


class Rule(BaseModel):
    rule_id: str
    text: str
    problem_id: str  # the problem whose failure produced the rule
    episode_id: str | None = None  # the episode that produced it
    expert: int | None = None  # the expert it was (or will be) trained into
    cycle: int = 0
    status: RuleStatus = "new"
    created_at: float
    updated_at: float
    retrieved: int = 0  # times offered to the solver (record_retrieved)
    helped: int = 0  # outcomes recorded as helpful (record_outcome)
    hurt: int = 0  # outcomes recorded as harmful
    update_id: str | None = None  # the training update it went into
    # Validation by effect: the share of sampled answers that verified with the rule in the
    # prompt and without it, on the problem it came from (None: never validated).
    share_with: float | None = None
    share_without: float | None = None
    prompts: list[str] = Field(default_factory=list)  # training prompts made from it
    merged_from: list[RuleSource] = Field(default_factory=list)  # near-duplicates folded in
    # "<counter>:<episode_id>" of every counted event: an episode's commit, rerun after a kill,
    # counts nothing twice (each counter and its mark are one metadata write).
    counted: list[str] = Field(default_factory=list)

    @property
    def outcome(self) -> str:
        """One of OUTCOMES, from the helped/hurt counters."""
        if self.helped == 0 and self.hurt == 0:
            return "untested"
        if self.helped > self.hurt:
            return "helped"
        if self.hurt > self.helped:
            return "hurt"
        return "even"

    def to_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "rule_id": self.rule_id,
            "problem_id": self.problem_id,
            "cycle": self.cycle,
            "status": self.status,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "retrieved": self.retrieved,
            "helped": self.helped,
            "hurt": self.hurt,
            "merged": len(self.merged_from),
            "prompts": json.dumps(self.prompts),
            "merged_from": json.dumps([s.model_dump() for s in self.merged_from]),
            "counted": json.dumps(self.counted),
        }
        for key in ("episode_id", "expert", "update_id", "share_with", "share_without"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        return meta

    @classmethod
    def from_chroma(cls, text: str, meta: dict[str, Any]) -> Rule:
        return cls(
            rule_id=meta["rule_id"],
            text=text,
            problem_id=meta["problem_id"],
            episode_id=meta.get("episode_id"),
            expert=meta.get("expert"),
            cycle=meta["cycle"],
            status=meta["status"],
            created_at=meta["created_at"],
            updated_at=meta["updated_at"],
            retrieved=meta.get("retrieved", 0),
            helped=meta.get("helped", 0),
            hurt=meta.get("hurt", 0),
            update_id=meta.get("update_id"),
            share_with=meta.get("share_with"),
            share_without=meta.get("share_without"),
            prompts=json.loads(meta.get("prompts", "[]")),
            merged_from=json.loads(meta.get("merged_from", "[]")),
            counted=json.loads(meta.get("counted", "[]")),
        )


# Metadata keys a where-filter may name, with the Python types their values have.
RULE_FILTER_KEYS: dict[str, tuple[type, ...]] = {
    "rule_id": (str,),
    "problem_id": (str,),
    "episode_id": (str,),
    "expert": (int,),
    "cycle": (int,),
    "status": (str,),
    "created_at": (int, float),
    "updated_at": (int, float),
    "retrieved": (int,),
    "helped": (int,),
    "hurt": (int,),
    "merged": (int,),
    "update_id": (str,),
    "share_with": (int, float),
    "share_without": (int, float),
}


class Episode(BaseModel):
    """One attempt at a problem: before/after verdicts, the routing used, the rules it produced.

    A re-evaluation or canary check of an update is an episode with ``update_id`` set; its
    before/after verdicts give the graph's fixed/broke edges.
    """

    problem_id: str
    problem_text: str
    split: str = "train"  # e.g. "train", "eval", "canary"
    cycle: int = 0
    verdict_before: bool | None = None  # correct before the update (None: not judged)
    verdict_after: bool | None = None  # correct after it (None: not judged yet)
    expert_weights: list[float] = Field(default_factory=list)  # router weights used, n_experts long
    rule_ids: list[str] = Field(default_factory=list)  # rules this episode produced
    update_id: str | None = None  # the update this episode re-evaluates, if any
    episode_id: str = ""  # empty: derived from (problem_id, split, cycle, update_id)
    similar_problems: list[str] = Field(default_factory=list)  # filled by the store
    created_at: float | None = None  # filled by the store
    updated_at: float | None = None  # filled by the store

    @field_validator("problem_id", "split")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value:
            raise ValueError("must be a non-empty string")
        return value

    @field_validator("expert_weights")
    @classmethod
    def _weights_valid(cls, value: list[float]) -> list[float]:
        if any(not math.isfinite(w) or w < 0 for w in value):
            raise ValueError(f"expert weights must be finite and >= 0, got {value}")
        return value

    @model_validator(mode="after")
    def _fill_id(self) -> Episode:
        if not self.episode_id:
            self.episode_id = episode_id_for(self.problem_id, self.split, self.cycle, self.update_id)
        return self

    @property
    def solved(self) -> bool | None:
        """The latest verdict: after the update if judged, else before."""
        return self.verdict_after if self.verdict_after is not None else self.verdict_before

    @property
    def change(self) -> Literal["fixed", "broke"] | None:
        """fixed: wrong before, right after; broke: right before, wrong after; else None."""
        if self.verdict_before is False and self.verdict_after is True:
            return "fixed"
        if self.verdict_before is True and self.verdict_after is False:
            return "broke"
        return None

    def to_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "episode_id": self.episode_id,
            "problem_id": self.problem_id,
            "split": self.split,
            "cycle": self.cycle,
            "expert_weights": json.dumps(self.expert_weights),
            "rule_ids": json.dumps(self.rule_ids),
            "similar_problems": json.dumps(self.similar_problems),
        }
        for key in ("verdict_before", "verdict_after", "update_id", "created_at", "updated_at"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        return meta

    @classmethod
    def from_chroma(cls, text: str, meta: dict[str, Any]) -> Episode:
        return cls(
            episode_id=meta["episode_id"],
            problem_id=meta["problem_id"],
            problem_text=text,
            split=meta["split"],
            cycle=meta["cycle"],
            verdict_before=meta.get("verdict_before"),
            verdict_after=meta.get("verdict_after"),
            expert_weights=json.loads(meta.get("expert_weights", "[]")),
            rule_ids=json.loads(meta.get("rule_ids", "[]")),
            update_id=meta.get("update_id"),
            similar_problems=json.loads(meta.get("similar_problems", "[]")),
            created_at=meta.get("created_at"),
            updated_at=meta.get("updated_at"),
        )


EPISODE_FILTER_KEYS: dict[str, tuple[type, ...]] = {
    "episode_id": (str,),
    "problem_id": (str,),
    "split": (str,),
    "cycle": (int,),
    "verdict_before": (bool,),
    "verdict_after": (bool,),
    "update_id": (str,),
    "created_at": (int, float),
    "updated_at": (int, float),
}


class RuleHit(BaseModel):
    rule: Rule
    similarity: float  # cosine similarity to the query text


class UpdateInfo(BaseModel):
    """A training update as the graph knows it: which rules went in, what it fixed and broke."""

    update_id: str
    expert: int | None
    rule_ids: list[str]
    fixed: list[str]  # problem ids that went wrong -> right in its re-evaluation/canary episodes
    broke: list[str]  # problem ids that went right -> wrong


class Provenance(BaseModel):
    """The chain problem -> failure -> rule -> prompts -> update -> outcome for one rule."""

    problem_id: str
    problem_text: str | None  # from the producing episode; None if the rule came without one
    failure: Episode | None  # the episode whose failure produced the rule
    rule: Rule
    prompts: list[str]  # training prompts made from the rule
    update: UpdateInfo | None  # None until the rule is trained
    outcome: str  # one of OUTCOMES, from the rule's counters


class MemoryStats(BaseModel):
    mode: Literal["embedded", "server"]
    writable: bool
    n_rules: int
    n_episodes: int
    n_problems: int
    rules_by_status: dict[str, int]
    rules_by_expert: dict[int, int]  # rules with a known expert, by expert
    rules_by_outcome: dict[str, int]
    retrieved: int  # summed over rules
    helped: int
    hurt: int
    graph_nodes: int
    graph_edges: int


@dataclass(frozen=True)
class MemoryFeatures:
    """What the memory tells the router and the solver about one question.

    ``vector`` is float32 of size ``MemoryConfig.feature_dim`` = embed_dim + n_experts:
    ``vector[:embed_dim]`` is the similarity-weighted mean embedding of the k nearest past
    episodes and k nearest rules; ``vector[embed_dim:]`` is their similarity-weighted
    expert-usage histogram (episodes: their router weights; rules: one-hot of their expert),
    summing to 1, or all zeros when no neighbour used a known expert.
    ``prior`` (n_experts,) sums to 1: smoothed counts of experts that helped on similar problems.
    ``rules`` are the texts of the nearest active rules, best first (ids in ``rule_ids``).
    """

    vector: np.ndarray  # (embed_dim + n_experts,) float32
    prior: np.ndarray  # (n_experts,) float32, sums to 1
    rules: list[str] = field(default_factory=list)
    rule_ids: list[str] = field(default_factory=list)
    episode_ids: list[str] = field(default_factory=list)  # the neighbour episodes used
