"""Benchmark the memory store: add throughput and latency, query latency, embedding share.

For each mode (embedded Chroma, a local `chroma run` server) and each size, a fresh store is
filled with that many rules from precomputed embeddings (random unit vectors, so no rule
merges), then timed:
  fill/s      rules per second through add_rules in batches (dedup query + write + graph)
  add p50/95  one add_rule (exact-id lookup, dedup query, write, graph update)
  query p50/95  one memory_features call with a precomputed question embedding
  embed share   embed / (embed + query) for one question with the real all-MiniLM-L6-v2
  load          1-minute load average when the row finished (the machine has os.cpu_count() cores)

Example:
    python bench/bench_memory.py --sizes 1000 10000 100000 --modes embedded server
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from memory_store.config import MemoryConfig
from memory_store.embedding import HashEmbedding, MiniLMEmbedding
from memory_store.records import NewRule
from memory_store.server import local_chroma_server
from memory_store.store import MemoryStore

QUESTIONS = [
    "Tom has 3 apples and buys 2 more. How many apples does he have?",
    "A train travels 120 km in 2 hours. What is its average speed?",
    "What is 15% of 80?",
    "If 4 pens cost $6, how much do 10 pens cost?",
]


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p95 in milliseconds."""
    ms = np.asarray(samples) * 1e3
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_one(config: MemoryConfig, embedder, size: int, args: argparse.Namespace, rng: np.random.Generator) -> dict:
    row: dict = {"mode": "embedded" if config.embedded else "server", "size": size}
    with MemoryStore.open(config, embedder=embedder) as store:
        start = time.perf_counter()
        for lo in range(0, size, args.batch):
            n = min(args.batch, size - lo)
            rules = [
                NewRule(text=f"bench rule {lo + i}", problem_id=f"p{(lo + i) % 5000}", expert=(lo + i) % 16)
                for i in range(n)
            ]
            results = store.add_rules(rules, embeddings=unit_vectors(rng, n, config.embed_dim))
            assert not any(merged for _, merged in results)
        row["fill_per_s"] = size / (time.perf_counter() - start)

        extra = unit_vectors(rng, args.adds, config.embed_dim)
        times = []
        for i in range(args.adds):
            t0 = time.perf_counter()
            store.add_rule(f"bench single rule {i}", problem_id="p-single", embedding=extra[i])
            times.append(time.perf_counter() - t0)
        row["add_p50"], row["add_p95"] = percentiles(times)

        questions = unit_vectors(rng, args.queries, config.embed_dim)
        for q in questions[:10]:  # warm caches (HNSW pages, sqlite) before timing
            store.memory_features("warm-up", embedding=q)
        times = []
        for q in questions:
            t0 = time.perf_counter()
            features = store.memory_features("benchmark question", embedding=q)
            times.append(time.perf_counter() - t0)
        assert features.vector.shape == (config.feature_dim,)
        row["query_p50"], row["query_p95"] = percentiles(times)

        if isinstance(embedder, MiniLMEmbedding):
            embed_t, total_t = [], []
            for i in range(args.model_queries):
                text = QUESTIONS[i % len(QUESTIONS)]
                t0 = time.perf_counter()
                vector = embedder([text])[0]
                t1 = time.perf_counter()
                store.memory_features(text, embedding=vector)
                t2 = time.perf_counter()
                embed_t.append(t1 - t0)
                total_t.append(t2 - t0)
            row["embed_p50"] = percentiles(embed_t)[0]
            row["embed_share"] = float(np.median(embed_t) / np.median(total_t))
        stats = store.stats()
        assert stats.n_rules == size + args.adds, stats
    row["load"] = os.getloadavg()[0]  # other work on the machine skews every figure
    return row


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'mode':<9} {'rules':>7} {'fill rules/s':>12} {'add p50 ms':>10} {'add p95 ms':>10} "
        f"{'query p50 ms':>12} {'query p95 ms':>12} {'embed ms':>8} {'embed share':>11} {'load':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        embed = f"{r['embed_p50']:8.1f} {r['embed_share']:10.0%}" if "embed_share" in r else f"{'-':>8} {'-':>11}"
        print(
            f"{r['mode']:<9} {r['size']:>7} {r['fill_per_s']:>12.0f} {r['add_p50']:>10.2f} {r['add_p95']:>10.2f} "
            f"{r['query_p50']:>12.2f} {r['query_p95']:>12.2f} {embed} {r['load']:>5.1f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000], help="rules per store")
    parser.add_argument("--modes", nargs="+", choices=["embedded", "server"], default=["embedded", "server"])
    parser.add_argument("--batch", type=int, default=1000, help="rules per add_rules call while filling")
    parser.add_argument("--adds", type=int, default=200, help="timed single add_rule calls")
    parser.add_argument("--queries", type=int, default=300, help="timed memory_features calls")
    parser.add_argument("--model-queries", type=int, default=50, help="timed calls embedding with MiniLM")
    parser.add_argument("--no-model", action="store_true", help="skip the real model (no embed share)")
    parser.add_argument("--workdir", type=Path, default=None, help="where stores go (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    embedder = HashEmbedding() if args.no_model else MiniLMEmbedding()
    rng = np.random.default_rng(args.seed)
    rows = []
    with ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-memory-")))
        url = None
        if "server" in args.modes:
            url = stack.enter_context(local_chroma_server(workdir / "server"))
        for mode in args.modes:
            for size in args.sizes:
                config = MemoryConfig(
                    run_dir=workdir / f"{mode}-{size}",
                    url=url if mode == "server" else None,
                    collection_prefix=f"bench{size}_",
                )
                print(f"[{mode} {size}] filling...", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                rows.append(bench_one(config, embedder, size, args, rng))
                print(f"[{mode} {size}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} CPU cores; {' '.join(sys.argv[1:])}")
    print_table(rows)


if __name__ == "__main__":
    main()
