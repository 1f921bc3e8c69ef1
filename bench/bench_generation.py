"""Generation speed on CPU: plain transformers generate versus the fast paths, in one run.

Prints, for the default model:
  - greedy tokens/s for 1 and 8 sequences of a fixed length: plain transformers ``generate``
    (the reference), the torch backend's continuous batching, and llama.cpp on each weight copy;
  - scoring GSM8K test problems (answer-line stop, 384-token cap, the solver's prompts): the
    reference in batches of 8 against continuous batching and llama.cpp at --slots (64), with the
    time, tokens/s, accuracy, and how many answers are token-identical to the reference and
    how many reach its final answer;
  - expert mixtures (8 sequences, a trained-looking bank): bare, one top-2 mixture, a different
    top-2 mixture per row, on the torch bank (both engines) and on llama.cpp LoRA adapters;
  - memory.

    python bench/bench_generation.py                                        # the default model
    python bench/bench_generation.py --score-problems 8 --skip-llamacpp     # a quicker run

Timings on a shared 2-core machine drift by up to 2x between runs, so compare ratios
within one run. The process runs with GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set, as run_loop.py does (see agents/lm/llamacpp.py).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.lm.openmp import bounded_openmp_wait  # noqa: E402

bounded_openmp_wait()  # before torch loads (child processes inherit it)

import torch  # noqa: E402

from adapters.bank import BankConfig, ExpertBank  # noqa: E402
from adapters.router import routing_weights  # noqa: E402
from agents.answers import is_correct  # noqa: E402
from agents.data_sources import open_source  # noqa: E402
from agents.lm.backend import DEFAULT_BATCH_SIZE, TorchBackend  # noqa: E402
from agents.lm.llamacpp import LlamaCppBackend, LlamaCppConfig, xllamacpp_available  # noqa: E402
from agents.lm.models import DEFAULT_MODEL, load_model  # noqa: E402
from agents.solver import Solver  # noqa: E402

LLAMA_WEIGHTS = ("f16", "q8_0", "gguf")  # llama.cpp's faithful copy, its fastest, and the GGUF as shipped
REFERENCE_BATCH = 8  # the plain generate reference: the batch size the project used before continuous batching
MIXTURE_LLAMA_WEIGHTS = "q8_0"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tokens_per_second(backend, prompts, new_tokens: int, weights=None) -> dict:
    start = time.perf_counter()
    outs = backend.generate(prompts, weights=weights, max_new_tokens=new_tokens)
    seconds = time.perf_counter() - start
    tokens = sum(o.new_tokens for o in outs)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}


def score(backend, problems) -> dict:
    start = time.perf_counter()
    attempts = Solver(backend).solve([p.question for p in problems])
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "correct": sum(is_correct(a.text, p.label)[0] for a, p in zip(attempts, problems)),
        "n": len(problems),
        "tokens": sum(a.tokens for a in attempts),
        "answers": [a.answer for a in attempts],
        "texts": [a.text for a in attempts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per sequence in the tokens/s runs")
    parser.add_argument("--score-problems", type=int, default=50)
    parser.add_argument("--slots", type=int, default=DEFAULT_BATCH_SIZE, help="continuous batching and llama.cpp slots")
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {
        "model": args.model,
        "threads": args.threads,
        "slots": args.slots,
        "openmp_wait": f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
    }
    loaded = load_model(args.model)
    use_llama = not args.skip_llamacpp and xllamacpp_available() and loaded.gguf_path is not None
    problems = open_source("test").take(max(args.score_problems, 8))
    results["rss_model_mb"] = rss_mb()
    bank = None

    def plain(batch: int = REFERENCE_BATCH) -> TorchBackend:
        return TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=batch, engine="generate")

    def continuous(slots: int) -> TorchBackend:
        return TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=slots)

    def llama(weights: str, slots: int) -> LlamaCppBackend:
        # room for the solver's prompt and its 384-token answer in every slot
        config = LlamaCppConfig(threads=args.threads, weights=weights, parallel=slots, ctx_per_sequence=1024)
        return LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, bank, config)

    prompts = [Solver(plain()).prompt(p.question) for p in problems]

    # --- tokens/s: fixed length, greedy, no answer-line stop --------------------------------------
    speed: dict = {}
    say("tokens/s: transformers generate (reference), 1 and 8 sequences")
    speed["transformers generate"] = {n: tokens_per_second(plain(), prompts[:n], args.new_tokens) for n in (1, 8)}
    say("tokens/s: torch continuous batching")
    speed["torch continuous batching"] = {n: tokens_per_second(continuous(n), prompts[:n], args.new_tokens) for n in (1, 8)}
    for weights in LLAMA_WEIGHTS if use_llama else ():
        before = rss_mb()
        start = time.perf_counter()
        with llama(weights, 8) as fast:
            results[f"copy_s_{weights}"] = time.perf_counter() - start  # ~0 once the copy is cached
            say(f"tokens/s: llama.cpp {weights}")
            speed[f"llama.cpp {weights}"] = {n: tokens_per_second(fast, prompts[:n], args.new_tokens) for n in (1, 8)}
            results[f"rss_llama_{weights}_mb"] = rss_mb() - before
    results["speed"] = {name: {str(n): m for n, m in per.items()} for name, per in speed.items()}

    # --- scoring GSM8K test problems: the workload of an evaluation arm ----------------------------
    subset = problems[: args.score_problems]
    scoring: dict = {}
    say(f"scoring {len(subset)} problems: transformers generate, batches of {REFERENCE_BATCH} (reference)")
    scoring[f"transformers generate, batches of {REFERENCE_BATCH}"] = score(plain(), subset)
    say(f"scoring: torch continuous batching, {args.slots} slots")
    before = rss_mb()
    fast_torch = continuous(args.slots)
    scoring[f"torch continuous batching, {args.slots} slots"] = score(fast_torch, subset)
    results["rss_continuous_mb"] = rss_mb() - before  # the bfloat16 head copy and the packed weights
    results["head_fallbacks"] = fast_torch.batcher.head.fallbacks if fast_torch.batcher.head is not None else None
    results["continuous_features"] = fast_torch.batcher.features
    del fast_torch
    for weights in ("f16", "q8_0") if use_llama else ():
        say(f"scoring: llama.cpp {weights}, {args.slots} slots")
        with llama(weights, args.slots) as fast:
            scoring[f"llama.cpp {weights}, {args.slots} slots"] = score(fast, subset)
    reference = next(iter(scoring.values()))
    for run in scoring.values():
        run["same_final_answer"] = sum(a == b for a, b in zip(run["answers"], reference["answers"]))
        run["identical_text"] = sum(a == b for a, b in zip(run["texts"], reference["texts"]))
    results["scoring"] = {name: {k: v for k, v in run.items() if k not in ("answers", "texts")} for name, run in scoring.items()}

    # --- expert mixtures: a trained-looking bank and top-2 mixtures, as the loop's router gives ----
    bank = ExpertBank(loaded.model, BankConfig(n_experts=args.experts, rank=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    top2 = routing_weights(torch.randn(1, args.experts, generator=generator), mode="top-k", top_k=2)
    per_row = routing_weights(torch.randn(8, args.experts, generator=generator), mode="top-k", top_k=2)
    results["mixture"] = {str(int(i)): round(float(top2[0, i]), 3) for i in top2[0].nonzero().flatten()}
    mixtures: dict = {}

    def mixture_runs(backend) -> dict:
        return {
            "bare": tokens_per_second(backend, prompts[:8], args.new_tokens),
            "one top-2 mixture": tokens_per_second(backend, prompts[:8], args.new_tokens, top2),
            "top-2 mixture per row": tokens_per_second(backend, prompts[:8], args.new_tokens, per_row),
        }

    say("mixtures, 8 sequences: torch bank, transformers generate and continuous batching")
    mixtures["torch bank, transformers generate"] = mixture_runs(plain())
    mixtures["torch bank, continuous batching"] = mixture_runs(continuous(8))
    if use_llama:
        with llama(MIXTURE_LLAMA_WEIGHTS, 8) as fast:
            say(f"mixtures: llama.cpp {MIXTURE_LLAMA_WEIGHTS} LoRA")
            mixtures[f"llama.cpp {MIXTURE_LLAMA_WEIGHTS} LoRA"] = mixture_runs(fast)
            start = time.perf_counter()
            fast.refresh()
            results["adapter_export_and_restart_s"] = time.perf_counter() - start
    results["mixtures"] = mixtures
    results["peak_rss_mb"] = peak_rss_mb()
    print_table(results)
    if args.json:
        print(json.dumps(results))


def print_table(r: dict) -> None:
    ref = r["speed"]["transformers generate"]
    print(f"model {r['model']}, {r['threads']} threads, {r['openmp_wait']}")
    print("\ngreedy tokens/s, fixed length (prompt included, no answer-line stop); ratio vs transformers generate, same sequences")
    print(f"{'variant':30s} {'seqs':>4s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>7s} {'ratio':>6s}")
    for name, per in r["speed"].items():
        for n, m in per.items():
            print(f"{name:30s} {n:>4s} {m['tokens']:7d} {m['seconds']:8.1f} {m['tok_s']:7.1f} {m['tok_s'] / ref[n]['tok_s']:6.1f}x")

    runs = r["scoring"]
    base = next(iter(runs.values()))
    n = base["n"]
    print(f"\nscoring {n} GSM8K test problems (solver prompts, answer-line stop, at most 384 tokens):")
    print(f"{'variant':44s} {'seconds':>7s} {'tok/s':>6s} {'ratio':>6s} {'correct':>8s} {'identical':>9s} {'same answer':>11s} {'min/100':>7s}")
    for name, m in runs.items():
        tok_s = m["tokens"] / m["seconds"]
        print(f"{name:44s} {m['seconds']:7.0f} {tok_s:6.1f} {tok_s / (base['tokens'] / base['seconds']):5.1f}x"
              f" {m['correct']:>4d}/{n:<3d} {m['identical_text']:>5d}/{n:<3d} {m['same_final_answer']:>7d}/{n:<3d}"
              f" {m['seconds'] / n * 100 / 60:7.1f}")
    print(f"continuous batching: {r['continuous_features']}; head rows re-scored in full float32: {r['head_fallbacks']}")

    print(f"\nexpert mixtures, 8 sequences, tokens/s (top-2 mixture {r['mixture']}):")
    for name, per in r["mixtures"].items():
        print(f"  {name:36s} " + "   ".join(f"{k} {m['tok_s']:.1f}" for k, m in per.items()))
    if "adapter_export_and_restart_s" in r:
        print(f"writing the expert LoRA files and restarting llama.cpp: {r['adapter_export_and_restart_s']:.1f}s")
    llama_mem = ", ".join(f"{w} +{r[f'rss_llama_{w}_mb']:.0f} MB" for w in LLAMA_WEIGHTS if f"rss_llama_{w}_mb" in r)
    print(f"memory: process RSS with the torch model {r['rss_model_mb']:.0f} MB; continuous batching adds"
          f" {r['rss_continuous_mb']:.0f} MB; llama.cpp server {llama_mem or '-'}; peak {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
