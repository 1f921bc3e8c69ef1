"""Rule queries on a run's memory, opened read-only.

``MemoryStore.open(..., writable=False)`` reads a consistent snapshot, so these work while a
loop is writing to the same run directory.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from agents.errors import MemoryStoreError
from graph.inspection.run_folder import check_run_folder, read_run_settings
from memory_store.config import MemoryConfig
from memory_store.embedding import EMBEDDERS, make_embedder
from memory_store.store import MemoryStore

log = logging.getLogger(__name__)


def open_memory(run_dir: str | Path, embedder: str = "auto") -> MemoryStore:
    """The run's memory, read-only. 'auto' uses the embedder the memory was built with.

    Chroma records the embedder of each collection and refuses another one, so 'auto' tries the
    cheap hash embedder first and opens with MiniLM when the collection says it was built with it.
    """
    run_dir = Path(run_dir)
    check_run_folder(run_dir, "memory")
    settings = read_run_settings(run_dir)
    config = MemoryConfig(run_dir=run_dir, url=settings.get("memory_url"),
                          n_experts=settings.get("bank", {}).get("n_experts", 16))
    if embedder != "auto" and embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be 'auto' or one of {', '.join(EMBEDDERS)}; got {embedder!r}")
    if embedder != "auto":
        return MemoryStore.open(config, embedder=make_embedder(embedder), writable=False)
    try:
        return MemoryStore.open(config, embedder=make_embedder("hash"), writable=False)
    except MemoryStoreError as err:
        if "another embedder" not in str(err):
            raise
        log.info("memory in %s was not built with the hash embedder; trying minilm", run_dir)
    return MemoryStore.open(config, embedder=make_embedder("minilm"), writable=False)


def _when(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def rule_row(rule) -> dict:
    return {"id": rule.rule_id, "created": _when(rule.created_at), "expert": rule.expert, "status": rule.status,
            "helped": rule.helped, "hurt": rule.hurt, "retrieved": rule.retrieved, "text": rule.text}


def list_rules(store: MemoryStore, *, expert: int | None = None, status: str | None = None,
               limit: int | None = None) -> list[dict]:
    return [rule_row(r) for r in store.list_rules(expert=expert, status=status, limit=limit)]


def show_rule(store: MemoryStore, rule_id: str) -> dict:
    """One rule's provenance chain: problem -> failure -> rule -> training prompts -> update -> outcome."""
    return store.show_rule(rule_id).model_dump(mode="json")


def search_rules(store: MemoryStore, text: str, k: int = 5) -> list[dict]:
    return [{"similarity": round(hit.similarity, 4), **rule_row(hit.rule)} for hit in store.search_rules(text, k)]


def rule_stats(store: MemoryStore) -> dict:
    stats = store.stats().model_dump(mode="json")
    stats["rules_by_expert"] = {str(k): v for k, v in sorted(store.stats().rules_by_expert.items())}
    return stats
