"""The bfloat16 decode engine before and after its step-cost fixes, side by side in one run.

Runs the same calls the loop and the scorer make, on the default model in bfloat16 with a
16-expert bank routed to one expert (as the loop routes), twice:
  - before: plain bfloat16 linears, the model's own logits_to_keep head, the active experts'
    factors gathered on every decode step, the one-level inverse-CDF draw;
  - now: oneDNN-reordered linears, the head on the last hidden state, the gathered factors
    kept while the experts are unchanged, the two-level draw.
Prints seconds and tokens/s per call, the ratio, and whether the greedy texts are identical.

    python bench/bench_decode.py --problems 32 --samples 6
"""

from __future__ import annotations

import argparse
import contextlib
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
    parser.add_argument("--problems", type=int, default=32, help="greedy scoring call: this many test problems")
    parser.add_argument("--samples", type=int, default=6, help="sampled call: this many samples of each of 4 problems")
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    import agents.lm.continuous_batching as cb
    from adapters.bank import ExpertBank, LoRABankLinear
    from agents.data_sources import bundled_source
    from agents.lm.generation import Request, Sampling, chat_prompt
    from agents.lm.precision import load_in_precision
    from agents.prompts import SOLVER_SYSTEM, SOLVER_USER

    loaded, choice = load_in_precision(args.model, "bfloat16")
    model, tokenizer = loaded.model, loaded.tokenizer
    bank = ExpertBank(model)
    with torch.no_grad():  # a trained-looking expert, so the bank's delta is not zero
        generator = torch.Generator().manual_seed(0)
        for layer in bank.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 1e-3)
    weights = bank.one_hot(0)
    questions = [p.question for p in bundled_source("test").problems[: args.problems]]
    prompts = [chat_prompt(tokenizer, SOLVER_SYSTEM, SOLVER_USER.format(rules="", question=q)) for q in questions]
    calls = {
        f"greedy, {len(prompts)} problems": Request(tuple(prompts), weights, args.max_new_tokens, True, Sampling()),
        f"sampled, 4 problems x {args.samples}": Request(
            tuple(p for p in prompts[:4] for _ in range(args.samples)), weights, args.max_new_tokens, True,
            Sampling(0.8, seed=1)),
    }

    now_draw, now_factors = cb._draw, LoRABankLinear._factors

    def before_draw(w, generator):
        cdf = w.double().cumsum(dim=-1)
        u = torch.rand(w.shape[0], 1, generator=generator, dtype=torch.float64, device=w.device)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp(max=w.shape[-1] - 1).squeeze(1).tolist()

    def before_factors(layer, mixture):
        layer._gathered = None
        return now_factors(layer, mixture)

    @contextlib.contextmanager
    def engine(before: bool):
        batcher = cb.ContinuousBatcher(model, tokenizer, bank, slots=64)
        if before:
            batcher.packed, batcher.plain_head = None, None
            cb._draw, LoRABankLinear._factors = before_draw, before_factors
        try:
            yield batcher
        finally:
            cb._draw, LoRABankLinear._factors = now_draw, now_factors

    with engine(False) as batcher:  # warm up: the reordered weights are made on first use
        batcher.generate_requests([Request(tuple(prompts[:2]), weights, 16, False, Sampling())])
    print(f"Qwen 0.5B bfloat16, 16-expert bank routed to one expert, {args.threads} threads, 64 slots, "
          f"{args.max_new_tokens}-token cap ({choice.used})", flush=True)
    for name, request in calls.items():
        results = {}
        for label, before in (("before", True), ("now", False)):
            with engine(before) as batcher:
                start = time.perf_counter()
                out = batcher.generate_requests([request])[0]
                seconds = time.perf_counter() - start
            tokens = sum(g.new_tokens for g in out)
            results[label] = (seconds, tokens, [g.text for g in out])
            print(f"  {name}, {label}: {seconds:.1f} s, {tokens} tokens, {tokens / seconds:.1f} tokens/s", flush=True)
        (b_s, b_t, b_texts), (n_s, n_t, n_texts) = results["before"], results["now"]
        same = sum(a == b for a, b in zip(b_texts, n_texts))
        print(f"{name}: tokens/s now / before = {(n_t / n_s) / (b_t / b_s):.2f}; "
              f"identical texts {same}/{len(b_texts)}", flush=True)


if __name__ == "__main__":
    main()
