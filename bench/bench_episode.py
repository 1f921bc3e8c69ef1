"""The learning episode as the unit of speed: wall time of episodes on failed train problems.

Runs the loop (the eval harness's `full` arm settings: samples, reflect and validation,
rationalization, variants, update, re-evaluation with the canary) over GSM8K train problems
on the default model, one precision and round size per process, and keeps the episodes
whose first greedy answer was wrong (those are the ones that learn; `--screen` picks such problems
beforehand, with the frozen model's greedy answers, so that no round goes to the others). An episode's seconds
are the sum of its nodes' (graph/episodes.py: in a round, a pooled call counts each episode's
share by rows), so that the episodes of a round add up to the round's wall time. Prints,
per precision and round size:
  - the failed episodes' seconds: median and p90, and the episodes right at the first try;
  - the wall time of all episodes, and episodes per hour;
  - where the time goes: seconds per node, summed over the failed episodes; generation calls
    per episode and their mean rows (what pooling a round's calls widens);
  - the ratios of the medians and of the wall times against the first setting, in this one run.

    python bench/bench_episode.py                              # 20 failed episodes per setting
    python bench/bench_episode.py --failed 6 --precisions bfloat16 --round-sizes 1,8
    python bench/bench_episode.py --precisions bfloat16 --round-sizes 8 --gates episode,round --max-episodes 8
    python bench/bench_episode.py --precisions float32 --round-sizes 8 --backends torch,llama.cpp --max-episodes 8
    python bench/bench_episode.py --precisions bfloat16 --round-sizes 8 --updates each,pooled --max-episodes 16
    python bench/bench_episode.py --precisions float32 --round-sizes 8 --screen 40 --max-episodes 20   # failed only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.lm.openmp import bounded_openmp_wait  # noqa: E402

bounded_openmp_wait()  # before torch loads (child processes inherit it)

from agents.lm.precision import check_precision_for_backend  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "int8")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class CallLog:
    """Wraps a backend's calls: rows, new tokens and seconds of every call."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []
        self._generate_requests = backend.generate_requests
        backend.generate_requests = self.generate_requests

    def generate_requests(self, requests):
        start = time.perf_counter()
        outs = self._generate_requests(requests)
        flat = [g for out in outs for g in out]
        self.calls.append({"rows": len(flat), "requests": len(requests), "tokens": sum(g.new_tokens for g in flat),
                           "longest": max((g.new_tokens for g in flat), default=0),
                           "seconds": time.perf_counter() - start})
        return outs


def screened(solver, problems: list, keep: int) -> tuple[list, dict]:
    """The problems the frozen model answers wrong greedily (the episode's own first try before any
    learning, in the same precision), at most ``keep`` of them, in their order."""
    from agents.verifier import check

    attempts = solver.solve([p.question for p in problems])
    wrong = [p for p, attempt in zip(problems, attempts) if not check(attempt, p.label).correct]
    return wrong[:keep], {"scored": len(problems), "wrong": len(wrong)}


def run_precision(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from agents.data_sources import open_source
    from agents.lm.backend import close_backend
    from agents.lm.precision import load_in_precision
    from graph.episodes import run_episodes
    from graph.evaluation.config import EvalConfig, arm_settings
    from graph.runner import build_context, problem_data
    from memory_store.embedding import make_embedder

    loaded, choice = load_in_precision(args.model, args.precision)
    source = open_source(args.data)
    problems = source.take(min(args.screen or args.max_episodes, source.size))
    config = EvalConfig(model=args.model, cycles=1, precision=args.precision, arms=("full",),
                        round_gate=args.gate == "round", backend=args.backend, pool_updates=args.update == "pooled")
    settings = arm_settings(config, "full", len(problems))
    node_seconds: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "bench-episode"
        run_dir.mkdir()
        ctx = build_context(loaded, settings, run_dir, embedder=make_embedder(config.embedder))
        screen = None
        if args.screen:
            start = time.perf_counter()
            problems, screen = screened(ctx.solver, problems, args.max_episodes)
            screen["seconds"] = time.perf_counter() - start
            print(f"  {choice.used}: screened {screen['scored']} problems in {screen['seconds']:.0f} s, "
                  f"{screen['wrong']} wrong at greedy, episodes on the first {len(problems)}", flush=True)
        calls = CallLog(ctx.backend)
        update = ctx.trainer.update
        updates: list[dict] = []

        def timed_update(*a, **k):
            start = time.perf_counter()
            result = update(*a, **k)
            updates.append({"seconds": time.perf_counter() - start, "texts": len(a[0])})
            return result

        ctx.trainer.update = timed_update
        episodes: list[dict] = []
        seconds: dict[int, float] = defaultdict(float)
        stream = [problem_data(p, learning=True, label_free=False) for p in problems]

        def on_event(event) -> None:
            node_seconds[event.episode][event.node] += event.seconds
            seconds[event.episode] += event.seconds

        start = time.perf_counter()
        for state in run_episodes(ctx, stream, run_dir=run_dir, round_size=args.round_size, on_event=on_event):
            index = state["episode"]
            episodes.append({"episode": index, "problem": state["problem"]["id"],
                             "first_correct": bool(state["first_try"]["correct"]), "outcome": state["outcome"],
                             "seconds": seconds[index], "updates": len(state.get("updates") or [])})
            failed = [e for e in episodes if not e["first_correct"]]
            print(f"  {choice.used}, {args.backend}, rounds of {args.round_size}, {args.gate} gate: episode {len(episodes)}: "
                  f"{'right' if episodes[-1]['first_correct'] else 'wrong'} at first, {episodes[-1]['seconds']:.1f} s "
                  f"({len(failed)}/{args.failed} failed)", flush=True)
            if len(failed) >= args.failed:
                break
        wall = time.perf_counter() - start
        if ctx.memory is not None:
            ctx.memory.close()
        backend = ctx.backend.description
        close_backend(ctx.backend)  # llama.cpp's server
    failed_ids = {e["episode"] for e in episodes if not e["first_correct"]}
    return {
        "precision": choice.used, "reason": choice.reason, "backend": backend,
        "round_size": args.round_size, "gate": args.gate, "update": args.update, "wall_seconds": wall,
        "screen": screen,
        "episodes": episodes,
        "node_seconds": {str(k): dict(v) for k, v in node_seconds.items() if k in failed_ids},
        "calls": calls.calls,
        "updates": updates,
    }


def summarize(result: dict) -> dict:
    failed = [e for e in result["episodes"] if not e["first_correct"]]
    right = [e for e in result["episodes"] if e["first_correct"]]
    seconds = [e["seconds"] for e in failed]
    by_node: dict[str, float] = defaultdict(float)
    for nodes in result["node_seconds"].values():
        for node, s in nodes.items():
            by_node[node] += s
    calls = result["calls"]
    return {
        "failed": len(failed), "right_first": len(right),
        "median": statistics.median(seconds) if seconds else None,
        "p90": percentile(seconds, 90) if seconds else None,
        "right_first_median": statistics.median([e["seconds"] for e in right]) if right else None,
        "wall": result["wall_seconds"], "episodes": len(result["episodes"]),
        "by_node": dict(by_node),
        "generation_seconds": sum(c["seconds"] for c in calls),
        "calls_per_episode": len(calls) / max(1, len(result["episodes"])),
        "mean_rows": statistics.mean(c["rows"] for c in calls) if calls else 0.0,
        "trainer_calls": len(result.get("updates", [])),
        "trainer_texts": sum(u["texts"] for u in result.get("updates", [])),
    }


def write_json(path: Path, results: dict) -> None:
    """Every measurement so far and its summary, replaced atomically."""
    summaries = {name: summarize(r) for name, r in results.items()}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps({"results": results, "summaries": summaries}, indent=2))
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--data", default="train", help="learning problems (agents.data_sources spec)")
    parser.add_argument("--failed", type=int, default=20, help="failed episodes to time per precision")
    parser.add_argument("--max-episodes", type=int, default=200, help="give up after this many episodes")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--round-sizes", default="1,8", help="episodes per round (graph/episodes.run_episodes)")
    parser.add_argument("--round-size", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--gates", default="round", help="'round' (a round's re-evaluations pooled and gated together), "
                        "'episode' (each update re-evaluated alone), or both, comma-separated")
    parser.add_argument("--gate", default="round", help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="torch", help="generation backends (agents.lm.backend.BACKENDS), "
                        "comma-separated: 'torch', 'llama.cpp' (the trainer is torch's either way)")
    parser.add_argument("--backend", default="torch", help=argparse.SUPPRESS)
    parser.add_argument("--updates", default="each", help="'each' (one update per episode), 'pooled' (one per round "
                        "on all its episodes' texts; needs the round gate), or both, comma-separated")
    parser.add_argument("--update", default="each", help=argparse.SUPPRESS)
    parser.add_argument("--screen", type=int, default=0, help="score this many problems greedy first (frozen model, "
                        "same precision) and run episodes only on those it gets wrong, so that no round is spent on "
                        "problems that learn nothing; 0 runs the problems in order")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.screen < 0:
        parser.error(f"--screen: {args.screen} is below 0 (0 runs the problems in order)")
    if args.child:
        args.precision = args.child
        print("RESULT " + json.dumps(run_precision(args)), flush=True)
        return

    results = {}
    settings = [(p, r, g, b, u) for p in args.precisions.split(",") for r in args.round_sizes.split(",")
                for g in args.gates.split(",") for b in args.backends.split(",") for u in args.updates.split(",")]
    # Pooled updates need the round gate: with both gates asked for, the episode gate runs updates each alone only.
    settings = [s for s in settings if not (s[4] == "pooled" and s[2] == "episode" and "round" in args.gates.split(","))]
    for precision, round_size, gate, backend, update in settings:  # every setting checked before any runs
        if precision not in PRECISIONS:
            parser.error(f"--precisions: {precision!r} is not one of {', '.join(PRECISIONS)}")
        try:
            check_precision_for_backend(precision, backend)
        except ValueError as err:
            parser.error(f"--precisions {precision} with --backends {backend}: {err}")
        if gate not in ("round", "episode"):
            parser.error(f"--gates: {gate!r} is neither 'round' nor 'episode'")
        if backend not in ("torch", "llama.cpp"):
            parser.error(f"--backends: {backend!r} is neither 'torch' nor 'llama.cpp'")
        if update not in ("each", "pooled"):
            parser.error(f"--updates: {update!r} is neither 'each' nor 'pooled'")
        if update == "pooled" and gate != "round":
            parser.error("--updates pooled needs the round gate: drop 'episode' from --gates")
    for precision, round_size, gate, backend, update in settings:
        cmd = [sys.executable, __file__, "--child", precision, "--round-size", round_size, "--gate", gate,
               "--backend", backend, "--model", args.model, "--data", args.data, "--failed", str(args.failed),
               "--max-episodes", str(args.max_episodes), "--threads", str(args.threads), "--update", update,
               "--screen", str(args.screen)]
        name = f"{precision}, {backend}, rounds of {round_size}, {gate} gate" + (", pooled updates" if update == "pooled" else "")
        print(f"{name}: running up to {args.failed} failed episodes", flush=True)
        result = None
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:  # progress shows as it comes
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result = json.loads(line[7:])
                else:
                    print(line, end="", flush=True)
        if proc.returncode or result is None:
            sys.exit(f"{name}: the measuring process failed (exit status {proc.returncode})")
        results[name] = result
        done = summarize(result)
        print(f"{name}: done, {done['failed']} failed, median {done['median'] or 0:.1f} s, "
              f"p90 {done['p90'] or 0:.1f} s, wall {done['wall']:.0f} s", flush=True)
        if args.json:  # after every setting (the last write is the whole run), so a stopped run keeps what it finished
            write_json(args.json, results)
    summaries = {name: summarize(r) for name, r in results.items()}
    print("\nsetting | episodes (failed) | failed median s | p90 s | right-first median s | wall s | episodes/hour | "
          "generation s | update s | updates (texts) | calls/episode | mean rows/call")
    for name, s in summaries.items():
        print(f"{name} | {s['episodes']} ({s['failed']}) | {s['median'] or 0:.1f} | {s['p90'] or 0:.1f} | "
              f"{s['right_first_median'] or 0:.1f} | {s['wall']:.0f} | {3600 * s['episodes'] / s['wall']:.1f} | "
              f"{s['generation_seconds']:.0f} | {s['by_node'].get('update', 0.0):.0f} | "
              f"{s['trainer_calls']} ({s['trainer_texts']}) | {s['calls_per_episode']:.1f} | "
              f"{s['mean_rows']:.1f}")
    for name, result in results.items():
        if result.get("screen"):
            screen = result["screen"]
            print(f"{name}: episodes on problems screened beforehand: {screen['wrong']} of {screen['scored']} "
                  f"wrong at greedy, {screen['seconds']:.0f} s (not in the wall time)")
    for name, s in summaries.items():
        total = sum(s["by_node"].values()) or 1.0
        print(f"\n{name}: seconds per node over the failed episodes (share of their time)")
        for node, sec in sorted(s["by_node"].items(), key=lambda kv: -kv[1]):
            print(f"  {node:<11} {sec:8.1f}  {sec / total:6.1%}")
    names = list(summaries)
    base = summaries[names[0]]
    for name in names[1:]:
        s = summaries[name]
        if base["median"] and s["median"]:
            print(f"\n{name} vs {names[0]}: failed-episode median {s['median'] / base['median']:.2f}x, "
                  f"wall time {s['wall'] / base['wall']:.2f}x for {s['episodes']} vs {base['episodes']} episodes "
                  "(target: a median of at most 45 s)")


if __name__ == "__main__":
    main()
