"""MemoryConfig: where the memory lives and how it turns neighbours into router features."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

# Chroma collection names allow [a-zA-Z0-9._-] and must start and end with a letter or digit.
_PREFIX_RE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass
class MemoryConfig:
    run_dir: str | Path  # the run directory; the memory lives in run_dir/memory/
    url: str | None = None  # None: embedded Chroma in run_dir; "http://host:port": a Chroma server
    collection_prefix: str = ""  # prefixes "rules" and "episodes", so runs can share one server apart
    embed_dim: int = 384  # embedding size; must match the embedder (all-MiniLM-L6-v2: 384)
    n_experts: int = 16  # experts in the adapter bank; must match BankConfig.n_experts
    k: int = 8  # nearest episodes and nearest rules used for memory features
    n_rules: int = 3  # top rules returned as text for the solve prompt (the loop passes SolverConfig.max_rules)
    dedup_threshold: float = 0.92  # cosine similarity at or above which a new rule merges into the old
    similar_threshold: float = 0.8  # cosine similarity at or above which two problems get similar_to
    prior_smoothing: float = 1.0  # additive (Laplace) pseudo-count per expert in the prior
    graph_autosave_s: float = 60.0  # save the graph JSON at most this often during writes (also on flush/close)
    lock_timeout_s: float = 30.0  # how long a reader waits for a consistent snapshot of an embedded store

    def __post_init__(self) -> None:
        if self.run_dir is None or str(self.run_dir) == "":
            raise ValueError(f"run_dir must be a directory path, got {self.run_dir!r}")
        self.run_dir = Path(self.run_dir)
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url must look like http://host:port or https://host:port, got {self.url!r}")
            try:
                _ = parts.port  # urlsplit checks the port only when asked
            except ValueError:
                raise ValueError(f"url has an invalid port: {self.url!r}") from None
        if not _PREFIX_RE.match(self.collection_prefix):
            raise ValueError(
                "collection_prefix may hold only letters, digits, '.', '_' and '-' and must start with "
                f"a letter or digit, got {self.collection_prefix!r}"
            )
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {self.n_experts}")
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.n_rules < 0:
            raise ValueError(f"n_rules must be >= 0, got {self.n_rules}")
        if not 0.0 < self.dedup_threshold <= 1.0:
            raise ValueError(f"dedup_threshold must be in (0, 1], got {self.dedup_threshold}")
        if not 0.0 < self.similar_threshold <= 1.0:
            raise ValueError(f"similar_threshold must be in (0, 1], got {self.similar_threshold}")
        if self.prior_smoothing <= 0:
            raise ValueError(f"prior_smoothing must be > 0 (a uniform prior needs it), got {self.prior_smoothing}")
        if self.graph_autosave_s < 0:
            raise ValueError(f"graph_autosave_s must be >= 0, got {self.graph_autosave_s}")
        if self.lock_timeout_s <= 0:
            raise ValueError(f"lock_timeout_s must be > 0, got {self.lock_timeout_s}")

    @property
    def feature_dim(self) -> int:
        """Size of MemoryFeatures.vector: embed_dim (mean neighbour embedding) + n_experts (usage histogram)."""
        return self.embed_dim + self.n_experts

    @property
    def embedded(self) -> bool:
        return self.url is None

    @property
    def memory_dir(self) -> Path:
        return Path(self.run_dir) / "memory"

    @property
    def rules_collection(self) -> str:
        return f"{self.collection_prefix}rules"

    @property
    def episodes_collection(self) -> str:
        return f"{self.collection_prefix}episodes"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["run_dir"] = str(self.run_dir)
        return out
