"""The expert bank's cost at inference in bfloat16, before and after its two fixes, side by side in one run.

The loop's pooled calls route every row to its own top-2 mixture, so a call's active experts
are most of the bank, while only the experts an update trained have a delta at all. Runs one
such call (distinct GSM8K prompts, greedy, a 16-expert bank with two trained experts, rows
routed over all 16) four ways, and the bare model:
  - float32 delta, every routed expert: the delta made in float32, converted and added (before);
  - float32 delta, untrained experts left out;
  - fused delta, every routed expert: the factors in bfloat16, the delta added in place by one product;
  - fused delta, untrained left out (now).
Prints seconds, tokens/s, the ratio to "before" and to the bare model, and how many texts
equal "before" (the fused delta rounds once instead of twice, so near-ties can flip).

    python bench/bench_bank_inference.py --problems 64 --max-new-tokens 128
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
    parser.add_argument("--problems", type=int, default=64, help="distinct test problems in the call (one row each)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the five variants")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

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
    n = bank.n_experts
    with torch.no_grad():  # two trained-looking experts; the other 14 untrained (B = 0), as after a few updates
        generator = torch.Generator().manual_seed(0)
        for layer in bank.layers.values():
            for expert in (0, 3):
                layer.lora_B[expert].copy_(torch.randn(layer.lora_B[expert].shape, generator=generator) * 1e-3)
    rows = torch.arange(args.problems)
    weights = torch.zeros(args.problems, n)  # top-2 per row, spread over every expert
    weights[rows, rows % n], weights[rows, (rows + 5) % n] = 0.6, 0.4
    questions = [p.question for p in bundled_source("test").problems[: args.problems]]
    prompts = [chat_prompt(tokenizer, SOLVER_SYSTEM, SOLVER_USER.format(rules="", question=q)) for q in questions]
    request = Request(tuple(prompts), weights, args.max_new_tokens, True, Sampling())

    fused, untrained = LoRABankLinear._add_delta_in_place, ExpertBank.untrained

    def float32_delta(layer, x, out, mixture):  # the path every precision took before
        flat_a, flat_b = layer._factors(mixture)
        scale = mixture.row_scale
        h = F.linear(layer.dropout(x).to(flat_a.dtype), flat_a)
        h = h * scale.view(scale.shape[0], *([1] * (h.dim() - 2)), scale.shape[1])
        return out + torch.matmul(h, flat_b).to(out.dtype)

    def none_untrained(self):
        return torch.zeros(self.n_experts, dtype=torch.bool)

    @contextlib.contextmanager
    def variant(delta, prune: bool):
        LoRABankLinear._add_delta_in_place = delta
        ExpertBank.untrained = untrained if prune else none_untrained
        try:
            yield
        finally:
            LoRABankLinear._add_delta_in_place, ExpertBank.untrained = fused, untrained

    variants = {
        "float32 delta, every routed expert (before)": (float32_delta, False),
        "float32 delta, untrained left out": (float32_delta, True),
        "fused delta, every routed expert": (fused, False),
        "fused delta, untrained left out (now)": (fused, True),
    }
    batcher = cb.ContinuousBatcher(model, tokenizer, bank, slots=64)
    batcher.generate_requests([Request(tuple(prompts[:2]), weights[:2], 8, False, Sampling())])  # warm up
    print(f"Qwen 0.5B bfloat16 ({choice.used}), 16-expert bank with 2 trained, rows routed top-2 over all 16, "
          f"{args.problems} problems greedy, {args.max_new_tokens}-token cap, {args.threads} threads, 64 slots", flush=True)
    runs: dict[str, list[tuple[float, int, list[str]]]] = {name: [] for name in [*variants, "bare model"]}
    for _ in range(args.rounds):
        for name in runs:
            if name == "bare model":
                call = Request(request.prompts, None, request.max_new_tokens, True, Sampling())
                context = contextlib.nullcontext()
            else:
                call, context = request, variant(*variants[name])
            with context:
                start = time.perf_counter()
                out = batcher.generate_requests([call])[0]
                seconds = time.perf_counter() - start
            runs[name].append((seconds, sum(g.new_tokens for g in out), [g.text for g in out]))
            print(f"  {name}: {seconds:.1f} s", flush=True)
    before = list(variants)[0]
    best = {name: min(r, key=lambda t: t[0]) for name, r in runs.items()}
    b_s, b_t, b_texts = best[before]
    bare_s, bare_t, _ = best["bare model"]
    print("| variant | seconds | tokens | tokens/s | vs before | vs bare | same text as before |")
    print("|---|---|---|---|---|---|---|")
    for name, (s, t, texts) in best.items():
        same = sum(a == b for a, b in zip(texts, b_texts))
        print(f"| {name} | {s:.1f} | {t} | {t / s:.1f} | {(t / s) / (b_t / b_s):.2f}x | {(t / s) / (bare_t / bare_s):.2f}x "
              f"| {same}/{len(texts)} |")


if __name__ == "__main__":
    main()
