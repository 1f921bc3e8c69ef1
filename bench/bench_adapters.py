"""Cost of the LoRA expert bank on CPU, measured side by side in one run.

Prints prefill and decode time of the bare model versus the 16-expert bank (dense and
top-2, every expert trained; and dense with one expert trained, as after a few Single-mode
updates: untrained experts are left out of inference), the einsum bank versus PEFT running the same 16 LoRA adapters active at once
(PEFT loops over adapters), the time of one training step, and peak memory.

    python bench/bench_adapters.py                      # the default model, qwen2.5-coder-0.5b
    python bench/bench_adapters.py --model tiny-random  # a quick smoke run

Timings on a shared 2-core machine drift by up to 2x between runs, so every variant is
measured in interleaved rounds and only ratios within one run are meaningful.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.bank import BankConfig, ExpertBank  # noqa: E402
from adapters.export import export_peft  # noqa: E402
from adapters.router import Router, RouterConfig, routing_weights  # noqa: E402
from adapters.trainer import TestTimeTrainer, TrainingExample  # noqa: E402
from agents.lm.models import DEFAULT_MODEL, load_model  # noqa: E402

QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def chat_ids(tokenizer, text: str) -> torch.Tensor:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def prefill_seconds(model, ids) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


@torch.no_grad()
def decode_seconds_per_token(model, ids, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decoding with the KV cache; time per generated token after the prefill."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    return (time.perf_counter() - start) / (new_tokens - 1), torch.cat(tokens, dim=1)


def interleaved(variants: dict, rounds: int, measure) -> dict[str, list[float]]:
    """Run measure(variant) for each variant in turn, `rounds` times, to share the drift."""
    times = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            times[name].append(measure(variant))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"model": args.model, "threads": args.threads, "experts": args.experts, "rank": args.rank}

    start = time.perf_counter()
    loaded = load_model(args.model)
    results["load_seconds"] = time.perf_counter() - start
    results["rss_after_load_mb"] = peak_rss_mb()
    model, tok = loaded.model, loaded.tokenizer
    ids = chat_ids(tok, QUESTION)
    results["prompt_tokens"] = ids.shape[1]
    print(f"model {args.model}: loaded in {results['load_seconds']:.1f}s, prompt {ids.shape[1]} tokens", file=sys.stderr)

    # A second copy stays bare (no wrappers at all), so it can be timed interleaved with the bank.
    bare_model = load_model(args.model).model
    bank = ExpertBank(model, BankConfig(n_experts=args.experts, rank=args.rank))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking experts: values do not change the cost, but outputs must differ from base
        for layer in bank.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
    # A third copy whose bank has trained one expert only (the rest are left out at inference).
    one_model = load_model(args.model).model
    one_bank = ExpertBank(one_model, BankConfig(n_experts=args.experts, rank=args.rank))
    with torch.no_grad():
        for layer, like in zip(one_bank.layers.values(), bank.layers.values()):
            layer.lora_B[0].copy_(like.lora_B[0])
    router = Router(model.config.hidden_size, args.experts, RouterConfig())
    logits = torch.randn(1, args.experts, generator=gen)
    dense = routing_weights(logits, mode="dense")
    top2 = routing_weights(logits, mode="top-k", top_k=2)
    results["rss_after_bank_mb"] = peak_rss_mb()

    class Routed:
        def __init__(self, weights):
            self.weights = weights

        def __call__(self, **kw):
            if self.weights is None:
                with bank.bypass():
                    return model(**kw)
            with bank.route(self.weights):
                return model(**kw)

    class OneTrained:
        def __call__(self, **kw):
            with one_bank.route(dense):
                return one_model(**kw)

    variants = {"bare": bare_model, "bypass": Routed(None), "dense16": Routed(dense), "top2": Routed(top2),
                "dense16_1trained": OneTrained()}
    for variant in variants.values():  # warm-up: first calls allocate and page weights in
        prefill_seconds(variant, ids)
        decode_seconds_per_token(variant, ids, 3)
    prefill = interleaved(variants, args.rounds, lambda v: prefill_seconds(v, ids))
    decode = interleaved(variants, args.rounds, lambda v: decode_seconds_per_token(v, ids, args.new_tokens)[0])
    bare_prefill, bare_decode = prefill["bare"], decode["bare"]
    med = statistics.median
    results["prefill_s"] = {k: med(v) for k, v in prefill.items()}
    results["decode_s_per_token"] = {k: med(v) for k, v in decode.items()}
    results["decode_ratio_vs_bare"] = {k: med(v) / med(bare_decode) for k, v in decode.items()}
    results["prefill_ratio_vs_bare"] = {k: med(v) / med(bare_prefill) for k, v in prefill.items()}

    # One training step on four GSM8K-shaped texts.
    trainer = TestTimeTrainer(model, tok, bank, router)
    example = TrainingExample(
        prompt=tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True),
        completion="In April she sold 48 clips. In May she sold 48 / 2 = 24 clips. "
        "Altogether she sold 48 + 24 = 72 clips. The answer is 72." * 2,
    )
    optimizer = trainer.new_optimizer(1e-3)
    step_times = []
    for _ in range(2):
        metrics = trainer.step([example] * 4, target_expert=1, optimizer=optimizer)
        step_times.append(metrics["seconds"])
    results["train_step_s"] = min(step_times)
    results["train_step_tokens"] = metrics["tokens"]
    results["peak_rss_mb"] = peak_rss_mb()

    if not args.skip_peft:
        results.update(compare_with_peft(args, bank, model, bare_model, ids, dense))

    print_table(results)
    if args.json:
        print(json.dumps(results))


def compare_with_peft(args, bank: ExpertBank, model, bare_model, ids, weights) -> dict:
    """The same 16 adapters under PEFT (injected into the bare copy), all active, each scaled by its weight."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    with tempfile.TemporaryDirectory() as tmp:
        names = [f"e{n}" for n in range(bank.n_experts)]
        for n, name in enumerate(names):
            export_peft(bank, Path(tmp) / name, expert=n)
        peft_model = PeftModel.from_pretrained(bare_model, Path(tmp) / names[0], adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(Path(tmp) / name, adapter_name=name)
    peft_model.base_model.set_adapter(names)
    peft_model.eval()
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for n, name in enumerate(names):
                module.set_scale(name, float(weights[0, n]))
    with torch.no_grad(), bank.route(weights):
        ours = model(input_ids=ids).logits
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    max_diff = (ours - theirs).abs().max().item()

    class Routed:
        def __call__(self, **kw):
            with bank.route(weights):
                return model(**kw)

    variants = {"bank_einsum": Routed(), "peft_loop": peft_model}
    prefill = interleaved(variants, args.rounds, lambda v: prefill_seconds(v, ids))
    decode = interleaved(variants, args.rounds, lambda v: decode_seconds_per_token(v, ids, args.new_tokens))
    tokens = {k: [t for _, t in v] for k, v in decode.items()}
    decode = {k: [s for s, _ in v] for k, v in decode.items()}
    med = statistics.median
    return {
        "peft_max_logit_diff": max_diff,
        "peft_same_greedy_tokens": all(torch.equal(a, b) for a, b in zip(tokens["bank_einsum"], tokens["peft_loop"])),
        "peft_prefill_s": {k: med(v) for k, v in prefill.items()},
        "peft_decode_s_per_token": {k: med(v) for k, v in decode.items()},
        "einsum_speedup_prefill": med(prefill["peft_loop"]) / med(prefill["bank_einsum"]),
        "einsum_speedup_decode": med(decode["peft_loop"]) / med(decode["bank_einsum"]),
    }


def print_table(r: dict) -> None:
    print(f"# bench_adapters: {r['model']}, {r['threads']} threads, {r['experts']} experts of rank {r['rank']}, prompt {r['prompt_tokens']} tokens")
    print("| variant | prefill s | ratio | decode ms/token | ratio |")
    print("|---|---|---|---|---|")
    for name in ("bare", "bypass", "dense16", "top2", "dense16_1trained"):
        print(
            f"| {name} | {r['prefill_s'][name]:.3f} | {r['prefill_ratio_vs_bare'][name]:.2f}x "
            f"| {1000 * r['decode_s_per_token'][name]:.1f} | {r['decode_ratio_vs_bare'][name]:.2f}x |"
        )
    print(f"train step (4 texts, {r['train_step_tokens']} tokens): {r['train_step_s']:.2f} s")
    print(f"peak RSS: {r['peak_rss_mb']:.0f} MB (after load {r['rss_after_load_mb']:.0f} MB, after bank {r['rss_after_bank_mb']:.0f} MB)")
    if "peft_prefill_s" in r:
        print(
            f"einsum bank vs PEFT with 16 active adapters: prefill {r['einsum_speedup_prefill']:.2f}x faster, "
            f"decode {r['einsum_speedup_decode']:.2f}x faster; max logit diff {r['peft_max_logit_diff']:.2e}, "
            f"same greedy tokens: {r['peft_same_greedy_tokens']}"
        )


if __name__ == "__main__":
    main()
