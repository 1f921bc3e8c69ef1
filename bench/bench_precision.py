"""Reduced precision judged by accuracy: float32 against bfloat16 and int8 on the default model, in one run.

Prints, per precision of the frozen weights (adapters stay float32):
  - the machine's measured peak: the best matrix-product GFLOP/s over the model's linear-layer
    shapes, at 64 rows (a full decode step) and at 2,400 rows (a training batch);
  - scoring GSM8K test problems (the solver's prompts, greedy, answer-line stop, 384-token cap,
    continuous batching at 64 slots): seconds, tokens/s, accuracy with Wilson 95% intervals,
    exact McNemar and flips against float32, and the achieved share of the 64-row peak;
  - one update step (forward and backward through the frozen model into the LoRA bank) on
    8 texts of about 300 tokens: seconds, tokens/s, share of the 2,400-row peak, peak memory;
    beside it, the same step with every expert in the optimizer (how it ran before the trainer
    trained the target expert alone), and one whole update call.
A precision is acceptable when McNemar p > 0.2 and its accuracy is within 2 points of float32.
int8 (float32 weights decoded through 8-bit copies of the linear layers) trains in float32, so
its update step is float32's and is not measured again; its peak is int8 GOP/s.

Each precision runs in its own process, so its peak memory is its own.

    python bench/bench_precision.py                         # 200 problems, every precision
    python bench/bench_precision.py --precisions float32,int8 --score-problems 20     # a quicker run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.lm.openmp import bounded_openmp_wait  # noqa: E402

bounded_openmp_wait()  # before torch loads (child processes inherit it)

PRECISIONS = ("float32", "bfloat16", "int8")
DECODE_ROWS = 64  # the torch backend's default slot count
TRAIN_ROWS = 2400  # 8 texts of about 300 tokens
UPDATE_TEXTS = 8


def linear_shapes(model) -> list[tuple[int, int]]:
    """Distinct (in, out) shapes of the model's linear layers, the output projection included."""
    import torch

    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    return sorted(shapes)


def flops_per_token(model, context: float) -> float:
    """Forward FLOPs per token: 2 per weight of every linear layer (head included) plus attention.

    Attention adds 2 * 2 * layers * (query heads * head dim) * context per token (scores and
    the weighted sum of values); the usual estimate (Kaplan et al. 2020, arXiv 2001.08361, sec. 2.1).
    """
    import torch

    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * weights + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context


def peak_gflops(precision: str, shapes, rows: int) -> dict:
    import torch

    from agents.lm.precision import measure_gflops

    measured = {}
    for i, o in shapes:
        kind = "int8" if precision == "int8" else getattr(torch, precision)
        (measured[f"{i}x{o}"],) = measure_gflops([kind], rows, i, o, seconds=0.5).values()
    return {"best": max(measured.values()), "by_shape": measured}


def run_precision(args) -> dict:
    """Everything measured in one precision, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    from adapters.bank import BankConfig, ExpertBank
    from adapters.router import Router, RouterConfig
    from adapters.trainer import TestTimeTrainer, TrainingExample
    from agents.data_sources import open_source
    from agents.lm.backend import make_backend
    from agents.lm.models import load_model
    from agents.solver import Solver, SolverConfig
    from agents.verifier import check

    loaded = load_model(args.model, dtype=args.only)
    shapes = linear_shapes(loaded.model)
    out = {"precision": args.only, "threads": torch.get_num_threads(),
           "peak_decode": peak_gflops(args.only, shapes, DECODE_ROWS),
           "peak_train": peak_gflops(args.only, shapes, TRAIN_ROWS)}
    problems = open_source("test").take(args.score_problems)
    solver = Solver(make_backend("torch", loaded, None, batch_size=DECODE_ROWS), SolverConfig(max_new_tokens=384))
    start = time.perf_counter()
    attempts = solver.solve([p.question for p in problems])
    seconds = time.perf_counter() - start
    tokens = sum(a.tokens for a in attempts)
    prompt_tokens = [len(loaded.tokenizer(solver.prompt(p.question))["input_ids"]) for p in problems]
    context = sum(pt + a.tokens / 2 for pt, a in zip(prompt_tokens, attempts)) / len(attempts)  # mean keys attended
    per_token = flops_per_token(loaded.model, context)
    out["scoring"] = {
        "problems": len(problems), "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
        "correct": [bool(check(a, p.label).correct) for a, p in zip(attempts, problems)],
        "texts": [a.text for a in attempts], "flops_per_token": per_token,
        "share_of_peak": tokens / seconds * per_token / 1e9 / out["peak_decode"]["best"],
    }
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if loaded.int8:  # training runs through the float32 weights: float32's update step
        out["update"] = None
        return out
    # One update step on 8 of the model's own answers (about 300 tokens with their prompts).
    bank = ExpertBank(loaded.model, BankConfig(n_experts=16))
    router = Router(loaded.model.config.hidden_size, bank.n_experts, RouterConfig()).to(loaded.device)
    trainer = TestTimeTrainer(loaded.model, loaded.tokenizer, bank, router)
    longest = sorted(range(len(attempts)), key=lambda i: -attempts[i].tokens)[:UPDATE_TEXTS]
    texts = [TrainingExample(solver.prompt(problems[i].question), attempts[i].text) for i in longest]
    features = trainer.prompt_features(texts)

    def loop_step() -> dict:
        """A step as TestTimeTrainer.update runs it: the target expert alone, prompt features computed once."""
        with trainer.parameters_for(3) as params:
            return trainer.step(texts, 3, trainer.new_optimizer(1e-4, params), features=features)

    def whole_bank_step() -> dict:
        """The step before the trainer optimized one expert alone: every expert in the optimizer."""
        return trainer.step(texts, 3, trainer.new_optimizer(1e-4))

    loop_step(), whole_bank_step()  # warm-up: allocations, kernel choice
    steps, whole = [], []
    for _ in range(args.update_repeats):  # interleaved, so drift hits both alike
        steps.append(loop_step())
        whole.append(whole_bank_step())
    best = min(steps, key=lambda m: m["seconds"])
    train_flops = 2 * per_token * best["tokens"]  # forward + activation gradients; frozen weights get none
    start = time.perf_counter()
    trainer.update(texts, 3)  # prompt features, loss before, the steps, loss after: what the loop's update node pays
    out["update"] = {"texts": len(texts), "tokens": best["tokens"], "seconds": best["seconds"],
                     "tokens_per_s": best["tokens_per_s"],
                     "share_of_peak": train_flops / best["seconds"] / 1e9 / out["peak_train"]["best"],
                     "whole_bank_seconds": min(m["seconds"] for m in whole),
                     "update_call_seconds": time.perf_counter() - start,
                     "steps_per_update": trainer.config.steps_per_update,
                     "finite_loss": all(m["loss"] == m["loss"] for m in steps + whole)}
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--score-problems", type=int, default=200)
    parser.add_argument("--update-repeats", type=int, default=3)
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="Comma-separated, float32 first (the reference): " + ", ".join(PRECISIONS))
    parser.add_argument("--only", choices=PRECISIONS, help=argparse.SUPPRESS)  # the per-precision child process
    parser.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(run_precision(args)))
        return
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if not precisions or precisions[0] != "float32" or not set(precisions) <= set(PRECISIONS):
        parser.error(f"--precisions must start with float32 and name only {', '.join(PRECISIONS)}; "
                     f"got {args.precisions!r}")
    from graph.evaluation.stats import compare, wilson_interval

    results = {}
    for precision in precisions:
        print(f"running {precision} ...", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, "--only", precision, "--model", args.model,
                                "--threads", str(args.threads), "--score-problems", str(args.score_problems),
                                "--update-repeats", str(args.update_repeats)],
                               capture_output=True, text=True, env={**os.environ}, check=False)
        if child.returncode != 0:
            sys.exit(f"{precision} failed:\n{child.stderr[-3000:]}")
        results[precision] = json.loads(child.stdout.strip().splitlines()[-1])
        if args.out:  # each precision as it finishes: a later one stopped loses only itself
            args.out.write_text(json.dumps(results, indent=2))
    base = results["float32"]
    print(f"\nmodel {args.model}, {args.threads} threads, {args.score_problems} GSM8K test problems, greedy, 384 tokens")
    print(f"{'precision':<10} {'peak@64':>9} {'peak@2400':>10} {'score s':>8} {'tok/s':>7} {'vs fp32':>8} {'right':>8} "
          f"{'95% CI':>12} {'w->r':>5} {'r->w':>5} {'McNemar p':>9} {'same text':>9} {'peak %':>7} "
          f"{'step s':>7} {'step tok/s':>10} {'step vs':>8} {'step peak %':>11} {'RSS MB':>7} ok")
    for precision, r in results.items():
        s, u = r["scoring"], r["update"]
        right = sum(s["correct"])
        low, high = wilson_interval(right, len(s["correct"]))
        c = compare(base["scoring"]["correct"], s["correct"])
        same = sum(a == b for a, b in zip(base["scoring"]["texts"], s["texts"]))
        delta = 100 * (right - sum(base["scoring"]["correct"])) / len(s["correct"])
        acceptable = c.p_value > 0.2 and abs(delta) <= 2
        print(f"{precision:<10} {r['peak_decode']['best']:>9.0f} {r['peak_train']['best']:>10.0f} {s['seconds']:>8.0f} "
              f"{s['tokens_per_s']:>7.1f} {s['tokens_per_s'] / base['scoring']['tokens_per_s']:>7.2f}x "
              f"{right:>4}/{len(s['correct']):<3} {100 * low:>5.1f}-{100 * high:<5.1f} {c.flips.wrong_right:>5} "
              f"{c.flips.right_wrong:>5} {c.p_value:>9.3f} {same:>9} {100 * s['share_of_peak']:>6.1f}% "
              + (f"{u['seconds']:>7.2f} {u['tokens_per_s']:>10.0f} {base['update']['seconds'] / u['seconds']:>7.2f}x "
                 f"{100 * u['share_of_peak']:>10.1f}% " if u else f"{'(float32 training)':>39} ")
              + f"{r['peak_rss_mb']:>7.0f} {'yes' if acceptable else 'NO'}")
    print("peak: best measured GFLOP/s (int8: GOP/s) over the model's linear shapes at 64 and 2400 rows; 'ok': "
          "McNemar p > 0.2 and accuracy within 2 points of float32")
    print(f"\nupdate step on {UPDATE_TEXTS} texts: the target expert alone (as the loop runs it) against an optimizer "
          "over the whole bank (before), and one whole update call")
    for precision, r in results.items():
        u = r["update"]
        if u is None:
            continue
        print(f"{precision:<10} step {u['seconds']:.2f} s, whole-bank step {u['whole_bank_seconds']:.2f} s "
              f"({u['whole_bank_seconds'] / u['seconds']:.2f}x), update call ({u['steps_per_update']} steps and the "
              f"losses before and after) {u['update_call_seconds']:.2f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
