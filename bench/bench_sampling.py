"""Sampled decoding as the loop and the vote arm use it: k answers per problem, side by side in one run.

Prints seconds and tokens/s of the same sampled calls with the token draw by torch.multinomial
and every row prefilled on its own (the engine before), and with the inverse-CDF draw and one
prefill per distinct prompt (the engine now), on the default model in bfloat16.

    python bench/bench_sampling.py --problems 16 --samples 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.lm.openmp import bounded_openmp_wait  # noqa: E402

bounded_openmp_wait()  # before torch loads (child processes inherit it)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--precision", default="bfloat16")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import agents.lm.continuous_batching as cb
    from agents.data_sources import bundled_source
    from agents.lm.backend import make_backend
    from agents.lm.generation import Sampling
    from agents.lm.precision import load_in_precision
    from agents.solver import Solver

    loaded, choice = load_in_precision(args.model, args.precision)
    questions = [p.question for p in bundled_source("test").problems[: args.problems]]
    flat = [q for q in questions for _ in range(args.samples)]
    solver = Solver(make_backend("torch", loaded, None))
    solver.config.max_new_tokens = args.max_new_tokens
    draw, same = cb._draw, cb._same_prompts

    def before_draw(weights, generator):
        return torch.multinomial(weights.float() / weights.float().sum(-1, keepdim=True), 1,
                                 generator=generator).squeeze(1).tolist()

    def every_row(group, ids, owner, weights, samplings):
        return list(group), []

    engines = {"multinomial, a prefill per row": (before_draw, every_row), "inverse CDF, one prefill per prompt": (draw, same)}
    solver.solve(flat[: args.samples], sampling=Sampling(0.8, seed=1))  # warm up
    results = {}
    for name, (d, s) in engines.items():
        cb._draw, cb._same_prompts = d, s
        start = time.perf_counter()
        attempts = solver.solve(flat, sampling=Sampling(0.8, seed=0))
        seconds = time.perf_counter() - start
        tokens = sum(a.tokens for a in attempts)
        results[name] = (seconds, tokens)
        print(f"{name}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.1f} tokens/s", flush=True)
    cb._draw, cb._same_prompts = draw, same
    (a_s, a_t), (b_s, b_t) = results.values()
    print(f"{len(flat)} sampled answers ({args.problems} problems x {args.samples}), {choice.used}: "
          f"tokens/s now / before = {(b_t / b_s) / (a_t / a_s):.2f}")


if __name__ == "__main__":
    main()
