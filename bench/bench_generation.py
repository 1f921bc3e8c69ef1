"""Generation speed on CPU: plain transformers generate versus the llama.cpp backend, in one run.

Prints greedy decoding tokens/s for 1 and 8 sequences (plain transformers ``generate``, the
reference, and each llama.cpp configuration), the time and accuracy of scoring GSM8K test
problems through the llama.cpp backend, how often torch and llama.cpp reach the same final
answer under the same expert mixture, and memory.

    python bench/bench_generation.py                                      # the default model
    python bench/bench_generation.py --score-problems 8 --equiv-problems 4   # a quicker run

Timings on a shared 2-core machine drift by up to 2x between runs, so compare ratios
within one run. The process runs with GOMP_SPINCOUNT=10000 unless OMP_WAIT_POLICY or
GOMP_SPINCOUNT is set, as run_loop.py does: torch and llama.cpp share one libgomp, whose
default spin-wait collapses when other jobs share the cores (see agents/backend_llamacpp.py).
"""

from __future__ import annotations

import os

if "OMP_WAIT_POLICY" not in os.environ:  # must precede the torch import
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.bank import BankConfig, ExpertBank  # noqa: E402
from adapters.router import routing_weights  # noqa: E402
from agents.answers import is_correct  # noqa: E402
from agents.backend import TorchBackend  # noqa: E402
from agents.backend_llamacpp import LlamaCppBackend, LlamaCppConfig  # noqa: E402

DEFAULT_WEIGHTS = LlamaCppConfig().weights  # f16: torch's numbers
FASTEST = "q8_0"  # the fastest weights measured here; the 16-slot, mixture and scoring runs use them
WEIGHTS = (DEFAULT_WEIGHTS, *(w for w in ("q8_0", "f16", "gguf") if w != DEFAULT_WEIGHTS))
from agents.gsm8k import load_problems  # noqa: E402
from agents.models import DEFAULT_MODEL, load_model  # noqa: E402
from agents.solver import Solver  # noqa: E402


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


def score(solver: Solver, problems, weights=None) -> dict:
    start = time.perf_counter()
    attempts = solver.solve([p.question for p in problems], weights=weights)
    seconds = time.perf_counter() - start
    correct = sum(is_correct(a.text, p.label)[0] for a, p in zip(attempts, problems))
    return {
        "seconds": seconds,
        "correct": correct,
        "n": len(problems),
        "tokens": sum(a.tokens for a in attempts),
        "answers": [a.answer for a in attempts],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens per sequence in the tokens/s runs")
    parser.add_argument("--score-problems", type=int, default=50)
    parser.add_argument("--equiv-problems", type=int, default=16)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results: dict = {
        "model": args.model,
        "threads": args.threads,
        "experts": args.experts,
        "openmp_wait": f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}",
    }

    loaded = load_model(args.model)
    if loaded.gguf_path is None:
        raise SystemExit(f"model {args.model!r} has no GGUF file; the llama.cpp backend needs one")
    problems = load_problems("test", limit=max(args.score_problems, args.equiv_problems, 16))
    plain = TorchBackend(loaded.model, loaded.tokenizer, None, batch_size=8)
    solver_prompts = [Solver(plain).prompt(p.question) for p in problems]
    results["rss_torch_model_mb"] = rss_mb()

    def llama(weights: str, **overrides) -> LlamaCppBackend:
        config = LlamaCppConfig(threads=args.threads, weights=weights, **overrides)
        return LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, bank, config)

    # --- tokens/s: greedy, no answer-line stop, the same prompts for every variant --------------
    bank = None
    speed: dict = {}
    say("torch reference: transformers generate, 1 and 8 sequences")
    speed["torch generate (f32)"] = {n: tokens_per_second(plain, solver_prompts[:n], args.new_tokens) for n in (1, 8)}
    for weights in WEIGHTS:
        rss_before = rss_mb()
        start = time.perf_counter()
        with llama(weights) as fast:
            results[f"copy_s_{weights}"] = time.perf_counter() - start  # ~0 once the copy is cached
            say(f"llama.cpp, {weights} weights")
            speed[f"llama.cpp {weights}"] = {n: tokens_per_second(fast, solver_prompts[:n], args.new_tokens) for n in (1, 8)}
            results[f"rss_llama_{weights}_mb"] = rss_mb() - rss_before
    with llama(FASTEST, parallel=16) as fast:
        say(f"llama.cpp, {FASTEST} weights, 16 slots")
        speed[f"llama.cpp {FASTEST}, 16 slots"] = {16: tokens_per_second(fast, solver_prompts[:16], args.new_tokens)}

    # A bank of trained-looking experts and top-2 mixtures, as the loop's router gives.
    bank = ExpertBank(loaded.model, BankConfig(n_experts=args.experts, rank=8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.01)
    top2 = routing_weights(torch.randn(1, args.experts, generator=generator), mode="top-k", top_k=2)
    per_row = routing_weights(torch.randn(8, args.experts, generator=generator), mode="top-k", top_k=2)
    results["mixture"] = {str(int(i)): round(float(top2[0, i]), 3) for i in top2[0].nonzero().flatten()}

    # --- expert mixtures: llama.cpp LoRA scales versus the torch bank, 8 sequences -------------
    mixtures: dict = {}
    with_bank = TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=8)
    say("mixtures: torch bank, one top-2 mixture and a different top-2 mixture per row")
    mixtures["torch bank"] = {
        "bare": tokens_per_second(with_bank, solver_prompts[:8], args.new_tokens),
        "one top-2 mixture": tokens_per_second(with_bank, solver_prompts[:8], args.new_tokens, top2),
        "top-2 mixture per row": tokens_per_second(with_bank, solver_prompts[:8], args.new_tokens, per_row),
    }
    with llama(FASTEST) as fast:
        say(f"mixtures: llama.cpp {FASTEST}, the same")
        mixtures[f"llama.cpp {FASTEST} LoRA"] = {
            "bare": tokens_per_second(fast, solver_prompts[:8], args.new_tokens),
            "one top-2 mixture": tokens_per_second(fast, solver_prompts[:8], args.new_tokens, top2),
            "top-2 mixture per row": tokens_per_second(fast, solver_prompts[:8], args.new_tokens, per_row),
        }
        start = time.perf_counter()
        fast.refresh()
        results["adapter_export_and_restart_s"] = time.perf_counter() - start
    results["mixtures"] = mixtures

    # --- the same final answer as torch: bare model (what "auto" sends to llama.cpp) and a mixture
    equiv = problems[: args.equiv_problems]
    results["equivalence"] = {"problems": len(equiv)}
    for label, weights in (("bare", None), ("top-2 mixture", top2)):
        subset = equiv if weights is None else equiv[: max(1, len(equiv) // 2)]
        say(f"equivalence, {label}: {len(subset)} problems, torch backend")
        ref_run = score(Solver(with_bank), subset, weights)
        block = {"problems": len(subset), "torch": {k: v for k, v in ref_run.items() if k != "answers"}}
        for name in WEIGHTS if weights is None else ("f16", "q8_0"):
            with llama(name) as fast:
                say(f"equivalence, {label}: llama.cpp {name}")
                run = score(Solver(fast), subset, weights)
            same = sum(a == b for a, b in zip(run["answers"], ref_run["answers"]))
            block[name] = {**{k: v for k, v in run.items() if k != "answers"}, "same_final_answer": same}
        results["equivalence"][label] = block

    # --- scoring GSM8K, frozen model (one arm), at the fastest setting ---------------------------
    bank = None
    with llama(FASTEST, parallel=16) as fast:
        say(f"scoring {args.score_problems} GSM8K test problems with llama.cpp ({FASTEST} weights, 16 slots)")
        run = score(Solver(fast), problems[: args.score_problems])
    results["score"] = {k: v for k, v in run.items() if k != "answers"}
    results["speed"] = {name: {str(n): m for n, m in per.items()} for name, per in speed.items()}
    results["peak_rss_mb"] = peak_rss_mb()
    print_table(results)
    if args.json:
        print(json.dumps(results))


def print_table(r: dict) -> None:
    ref = r["speed"]["torch generate (f32)"]
    print(f"model {r['model']}, {r['threads']} threads, {r['openmp_wait']}")
    print("\ngreedy decoding tokens/s (prompt included, no answer-line stop); ratio vs transformers generate with 1 or 8 sequences")
    print(f"{'variant':34s} {'seqs':>4s} {'tokens':>7s} {'seconds':>8s} {'tok/s':>7s} {'ratio':>6s}")
    for name, per in r["speed"].items():
        for n, m in per.items():
            base = ref.get(n) or ref["8"]  # 16 slots are compared with 8 torch sequences
            print(f"{name:34s} {n:>4s} {m['tokens']:7d} {m['seconds']:8.1f} {m['tok_s']:7.1f} {m['tok_s'] / base['tok_s']:6.1f}x")
    print(f"\nexpert mixtures, 8 sequences, tokens/s (top-2 mixture {r['mixture']}):")
    for name, per in r["mixtures"].items():
        print(f"  {name:28s} " + "   ".join(f"{k} {m['tok_s']:.1f}" for k, m in per.items()))
    for label, e in ((k, v) for k, v in r["equivalence"].items() if k != "problems"):
        t = e["torch"]
        print(f"\nsame final answer as the torch backend, {label}, {e['problems']} GSM8K test problems:")
        print(f"  {'torch backend (reference)':28s} {t['correct']}/{t['n']} correct, {t['seconds']:.0f}s, {t['tokens'] / t['seconds']:.1f} tok/s")
        for name, m in ((k, v) for k, v in e.items() if k not in ("torch", "problems")):
            print(
                f"  {'llama.cpp ' + name:28s} {m['correct']}/{m['n']} correct, {m['seconds']:.0f}s, {m['tokens'] / m['seconds']:.1f} tok/s;"
                f" same final answer {m['same_final_answer']}/{e['problems']} ({m['same_final_answer'] / e['problems']:.0%})"
            )
    s = r["score"]
    print(
        f"\nscoring {s['n']} GSM8K test problems, llama.cpp {FASTEST}, 16 slots (answer-line stop, max 384 tokens):"
        f" {s['seconds']:.0f}s, {s['tokens']} tokens ({s['tokens'] / s['seconds']:.1f} tok/s), {s['correct']}/{s['n']} correct;"
        f" 100 problems ~ {s['seconds'] / s['n'] * 100 / 60:.1f} min"
    )
    copies = ", ".join(f"{w} {r[f'copy_s_{w}']:.1f}s" for w in WEIGHTS)
    print(f"writing {r['experts']} expert LoRA files and restarting llama.cpp: {r['adapter_export_and_restart_s']:.1f}s;"
          f" making the re-encoded GGUF copies: {copies} (0 when cached)")
    llama_mem = ", ".join(f"{w} +{r[f'rss_llama_{w}_mb']:.0f} MB" for w in WEIGHTS)
    print(f"memory: process RSS with the torch model {r['rss_torch_model_mb']:.0f} MB; llama.cpp server {llama_mem};"
          f" peak {r['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
