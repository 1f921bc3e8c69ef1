"""Continuous batching in the torch backend: token-identical to transformers generate on the tiny model.

The tiny model runs in float32 with one prompt per slot count and mixture; every variant must
reproduce the generate path's tokens exactly, including rows that end at different steps
(slots are refilled and the cache closes up) and per-row expert mixtures.
"""

import pytest
import torch

from adapters.bank import BankConfig, ExpertBank
from agents.lm.backend import TorchBackend
from agents.lm.continuous_batching import ContinuousBatcher, _common_prefix
from agents.lm.generation import Request, Sampling, generate

QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A pen costs $2. How much do 5 pens cost?",
    "What is 7 times 8?",
    "Sara reads 12 pages a day for 3 days. How many pages does she read?",
    "Split 20 candies among 4 kids.",
    "1+1?",
]


@pytest.fixture
def tiny_bank(tiny):
    bank = ExpertBank(tiny.model, BankConfig(n_experts=3, rank=4))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[1:].normal_(0, 0.5, generator=generator)
    return tiny, bank


def _prompts(tiny, questions=QUESTIONS):
    backend = TorchBackend(tiny.model, tiny.tokenizer, None)
    return [backend.chat_prompt("You solve grade-school math problems.", q) for q in questions]


def _texts(generations):
    return [(g.text, g.new_tokens) for g in generations]


@pytest.mark.parametrize("slots", [1, 2, 4, 8])
def test_greedy_matches_generate_for_any_slot_count(tiny, slots):
    prompts = _prompts(tiny)
    expected = generate(tiny.model, tiny.tokenizer, None, prompts, max_new_tokens=30, stop_at_answer=False)
    got = ContinuousBatcher(tiny.model, tiny.tokenizer, None, slots=slots).generate(
        prompts, max_new_tokens=30, stop_at_answer=False
    )
    assert _texts(got) == _texts(expected)


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_bfloat16_greedy_matches_bfloat16_generate(slots):
    """Reduced precision: the same precision's plain generate is the reference (float32 differs, by design).

    In bfloat16, plain generate's own texts depend on how many rows it decodes together (per-row
    mixtures sum in another order at another row count: seen at 1 row against 6 on an AMD EPYC),
    so the reference generates the prompts in the batcher's groups: ``slots`` at a time. Every row
    here runs to the cap, so the batcher's slots turn over in exactly those groups.
    """
    from agents.lm.models import load_model

    tiny = load_model("tiny-random", dtype="bfloat16")
    bank = ExpertBank(tiny.model, BankConfig(n_experts=3, rank=4))
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[1:].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    assert next(tiny.model.parameters()).dtype == torch.bfloat16 and bank.adapter_parameters()[0].dtype == torch.float32
    prompts = _prompts(tiny)
    for weights in (None, torch.tensor([[0.0, 0.7, 0.3]]), torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]] * 2)):
        expected = []
        for start in range(0, len(prompts), slots):
            rows = None if weights is None or weights.shape[0] == 1 else weights[start : start + slots]
            expected += generate(tiny.model, tiny.tokenizer, bank, prompts[start : start + slots],
                                 weights if rows is None else rows, max_new_tokens=24, stop_at_answer=False)
        assert all(e.new_tokens == 24 for e in expected)  # no row ended early, so the slots turn over in groups
        got = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=slots).generate(
            prompts, weights, max_new_tokens=24, stop_at_answer=False
        )
        assert _texts(got) == _texts(expected), f"weights {weights}"


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_int8_greedy_matches_int8_generate(slots):
    """int8 decoding: plain generate through the same 8-bit layers is the reference, at any slot
    count and mixture (each row's activations are quantized on their own, so the other rows of a
    call change nothing), while float32 gives other texts."""
    from agents.lm.cpu_kernels import Int8Linears
    from agents.lm.models import load_model

    if "fbgemm" not in torch.backends.quantized.supported_engines:
        pytest.skip("torch without fbgemm's int8 kernels")
    tiny = load_model("tiny-random", dtype="int8")
    int8 = Int8Linears.for_model(tiny.model)
    assert tiny.int8 and next(tiny.model.parameters()).dtype == torch.float32
    bank = ExpertBank(tiny.model, BankConfig(n_experts=3, rank=4))
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[1:].normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    prompts = _prompts(tiny)
    for weights in (None, torch.tensor([[0.0, 0.7, 0.3]]), torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]] * 2)):
        with torch.no_grad(), int8.swapped():
            expected = generate(tiny.model, tiny.tokenizer, bank, prompts, weights, max_new_tokens=24,
                                stop_at_answer=False)
        backend = TorchBackend(tiny.model, tiny.tokenizer, bank, batch_size=slots, int8=True)
        assert "int8 linears" in backend.description
        got = backend.generate(prompts, weights=weights, max_new_tokens=24)
        assert _texts(got) == _texts(expected), f"weights {weights}"
    float32 = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=slots).generate(
        prompts, weights, max_new_tokens=24, stop_at_answer=False)
    assert _texts(float32) != _texts(got)


def test_rows_that_end_early_leave_and_waiting_prompts_take_their_slots(tiny):
    """Make a common token an end-of-sequence token: rows stop at different steps, in both paths."""
    prompts = _prompts(tiny)
    encoded = tiny.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    width = encoded["input_ids"].shape[1]

    def run_generate():
        return tiny.model.generate(**encoded, max_new_tokens=30, do_sample=False, pad_token_id=tiny.tokenizer.pad_token_id)

    stop = int(run_generate()[0, width + 3])  # the 4th token the model writes for the first prompt
    original = tiny.model.generation_config.eos_token_id
    tiny.model.generation_config.eos_token_id = [original, stop]
    try:
        expected = run_generate()
        got = ContinuousBatcher(tiny.model, tiny.tokenizer, None, slots=2).generate(
            prompts, max_new_tokens=30, stop_at_answer=False
        )
    finally:
        tiny.model.generation_config.eos_token_id = original
    lengths = []
    for row, generation in zip(expected[:, width:], got):
        ids = row.tolist()
        cut = next((i for i, t in enumerate(ids) if t in (original, stop)), len(ids))
        assert generation.text == tiny.tokenizer.decode(ids[:cut], skip_special_tokens=True)
        assert generation.new_tokens == cut
        lengths.append(cut)
    assert len(set(lengths)) > 1, f"every row ended at the same step {lengths}: nothing was refilled"


def test_per_row_and_shared_mixtures_match_generate(tiny_bank):
    tiny, bank = tiny_bank
    prompts = _prompts(tiny)
    mixtures = [
        torch.tensor([[0.0, 0.7, 0.3]]),  # one mixture for all: the shared prefix is reused
        torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 0.5, 0.5], [0, 1, 0], [0, 0, 1]]),  # one per row
    ]
    for weights in mixtures:
        expected = generate(tiny.model, tiny.tokenizer, bank, prompts, weights, max_new_tokens=24, stop_at_answer=False)
        got = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=4).generate(
            prompts, weights, max_new_tokens=24, stop_at_answer=False
        )
        assert _texts(got) == _texts(expected), f"weights {weights}"
    bare = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=4).generate(prompts, max_new_tokens=24, stop_at_answer=False)
    assert _texts(bare) != _texts(got)


def test_the_answer_line_stop_matches_generate(tiny, monkeypatch):
    """Both paths stop a row on the token that completes the stop pattern, and only that row."""
    import re

    import agents.lm.generation

    prompts = _prompts(tiny)
    free_run = generate(tiny.model, tiny.tokenizer, None, prompts, max_new_tokens=20, stop_at_answer=False)
    # a word the tiny model writes mid-answer for one prompt stands in for "The answer is N."
    ids = tiny.tokenizer(free_run[2].text, add_special_tokens=False)["input_ids"]
    word = next(w for w in (tiny.tokenizer.decode([i]).strip() for i in ids[5:]) if len(w) >= 2)
    pattern = re.compile(re.escape(word))
    monkeypatch.setattr(agents.lm.generation, "ANSWER_COMPLETE", pattern)  # the one stop check every backend uses
    expected = generate(tiny.model, tiny.tokenizer, None, prompts, max_new_tokens=20, stop_at_answer=True)
    got = ContinuousBatcher(tiny.model, tiny.tokenizer, None, slots=3).generate(prompts, max_new_tokens=20, stop_at_answer=True)
    assert _texts(got) == _texts(expected)
    assert expected[2].new_tokens < 20 and word in expected[2].text


def test_sampling_repeats_with_its_seed_and_differs_from_greedy(tiny):
    prompts = _prompts(tiny)[:3]
    batcher = ContinuousBatcher(tiny.model, tiny.tokenizer, None, slots=2)
    first = batcher.generate(prompts, max_new_tokens=16, sampling=Sampling(1.0, 0.9, 5))
    assert _texts(first) == _texts(batcher.generate(prompts, max_new_tokens=16, sampling=Sampling(1.0, 0.9, 5)))
    assert _texts(first) != _texts(batcher.generate(prompts, max_new_tokens=16, sampling=Sampling(1.0, 0.9, 6)))
    assert _texts(first) != _texts(batcher.generate(prompts, max_new_tokens=16))


def test_requests_decoded_together_equal_each_request_alone(tiny_bank):
    """One call serving several agents' requests: per-request caps, answer stops, mixtures and sampling."""
    tiny, bank = tiny_bank
    prompts = _prompts(tiny)
    requests = [
        Request(tuple(prompts[:2]), None, max_new_tokens=12),  # the bare model (zero weights beside mixtures)
        Request(tuple(prompts[2:4]), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), max_new_tokens=30),
        Request(tuple(prompts[4:]), torch.tensor([[0.0, 0.6, 0.4]]), max_new_tokens=20, stop_at_answer=True,
                sampling=Sampling(temperature=0.9, seed=5)),
        Request((prompts[0],), torch.tensor([[0.0, 0.6, 0.4]]), max_new_tokens=8,
                sampling=Sampling(temperature=0.9, seed=11)),
    ]
    batcher = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=8)
    together = batcher.generate_requests(requests)
    for request, got in zip(requests, together):
        (alone,) = batcher.generate_requests([request])
        assert len(got) == len(request.prompts)
        assert all(g.new_tokens <= request.max_new_tokens for g in got)
        if request.sampling.greedy:  # greedy rows do not depend on what else is in the batch
            assert _texts(got) == _texts(alone)
            via_generate = generate(tiny.model, tiny.tokenizer, bank, list(request.prompts), request.weights,
                                    max_new_tokens=request.max_new_tokens, stop_at_answer=request.stop_at_answer)
            assert _texts(got) == _texts(via_generate)
    # a request alone is what generate gives it, sampled ones included (same seed, same rows)
    sampled = requests[2]
    assert _texts(batcher.generate_requests([sampled])[0]) == _texts(batcher.generate(
        list(sampled.prompts), sampled.weights, max_new_tokens=20, stop_at_answer=True, sampling=Sampling(0.9, seed=5)))
    assert _texts(batcher.generate_requests(requests)[2]) == _texts(together[2])  # repeatable


def test_repeats_of_a_sampled_prompt_are_prefilled_once_and_decode_from_the_copied_cache(tiny_bank, monkeypatch):
    """k copies of a prompt at a temperature so low that sampling is greedy: each copy must give the greedy text."""
    tiny, bank = tiny_bank
    prompts = _prompts(tiny)[:2]
    weights = torch.tensor([[0.0, 0.6, 0.4]])
    batcher = ContinuousBatcher(tiny.model, tiny.tokenizer, bank, slots=8)
    greedy = batcher.generate(prompts, weights, max_new_tokens=20, stop_at_answer=False)
    prefilled = []
    real = ContinuousBatcher._forward_block

    def counting(self, cache, first, suffixes, prefix, w):
        prefilled.append(len(suffixes))
        return real(self, cache, first, suffixes, prefix, w)

    monkeypatch.setattr(ContinuousBatcher, "_forward_block", counting)
    repeated = [prompts[0]] * 4 + [prompts[1]] * 3
    near_greedy = batcher.generate(repeated, weights, max_new_tokens=20, stop_at_answer=False, sampling=Sampling(1e-4, seed=3))
    assert prefilled[-1] == 2  # seven rows, two distinct prompts (before it, float32's shared-prefix pass)
    assert _texts(near_greedy) == _texts([greedy[0]] * 4 + [greedy[1]] * 3)
    sampled = batcher.generate(repeated, weights, max_new_tokens=20, stop_at_answer=False, sampling=Sampling(1.5, seed=3))
    assert len({g.text for g in sampled[:4]}) > 1  # the copies still draw their own tokens


def test_the_inverse_cdf_draw_follows_the_weights():
    from agents.lm.continuous_batching import _draw

    weights = torch.tensor([[1.0, 0.0, 3.0, 6.0]]).repeat(40_000, 1)  # unnormalised
    drawn = torch.tensor(_draw(weights, torch.Generator().manual_seed(0)))
    shares = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert shares[1] == 0  # a zero weight is never drawn
    assert torch.allclose(shares, torch.tensor([0.1, 0.0, 0.3, 0.6]), atol=0.01)


def test_the_two_level_draw_is_the_inverse_cdf_over_the_whole_vocabulary():
    from agents.lm.continuous_batching import DRAW_BLOCK, _draw

    vocab = 5 * DRAW_BLOCK + 17  # blocks, and a part-filled last one
    generator = torch.Generator().manual_seed(4)
    weights = torch.rand(3_000, vocab, generator=generator) ** 8  # peaked rows, with zeros set below
    weights[:, ::7] = 0
    drawn = torch.tensor(_draw(weights, torch.Generator().manual_seed(9)))
    u = torch.rand(len(weights), 1, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    cdf = weights.double().cumsum(dim=-1)  # the one-level walk the two levels stand for
    expected = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1)
    assert (drawn == expected).float().mean() > 0.999  # the same token for the same number, up to rounding at a boundary
    assert not bool((weights.gather(1, drawn.unsqueeze(1)) == 0).any())  # a zero weight is never drawn


def test_a_number_on_a_block_edge_never_draws_a_zero_weight(monkeypatch):
    """Rounding between the block totals and a block's own running sum must not reach a zero-weight token."""
    from agents.lm.continuous_batching import DRAW_BLOCK, _draw

    blocks = 8
    weights = torch.rand(1024, blocks * DRAW_BLOCK, generator=torch.Generator().manual_seed(2)) ** 8 * 1000
    for edge in range(1, blocks):  # zeros on both sides of every block edge, and at the end
        weights[:, edge * DRAW_BLOCK - 8 : edge * DRAW_BLOCK + 8] = 0
    weights[:, -8:] = 0
    ends = weights.double().view(len(weights), blocks, DRAW_BLOCK).sum(-1).cumsum(-1)  # (rows, blocks)
    for edge in range(blocks - 1):
        for ulps in (-2, -1, 0, 1, 2):  # u on the edge, and a few roundings either side of it
            u = (ends[:, edge : edge + 1] / ends[:, -1:] * (1 + ulps * 2**-52)).clamp(0, 1 - 2**-53)
            monkeypatch.setattr(torch, "rand", lambda *args, u=u, **kwargs: u)
            drawn = torch.tensor(_draw(weights, None))
            assert not bool((weights.gather(1, drawn.unsqueeze(1)) == 0).any()), (edge, ulps)


def test_a_request_with_mismatched_weights_is_refused():
    with pytest.raises(ValueError, match="weights for 2 rows and 3 prompts"):
        Request(("a", "b", "c"), torch.zeros(2, 4))


def test_common_prefix():
    assert _common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert _common_prefix([[5, 6], [7]]) == 0


@pytest.mark.slow
def test_qwen_continuous_batching_gives_the_plain_generate_answers():
    """A handful of GSM8K problems on the real model, bare and under a mixture: the same text as generate.

    Float32 continuous batching is token-identical to plain generate (bench/bench_generation.py),
    so the first 24 tokens of each answer are compared whole (each further token costs seconds
    on a CPU without AVX-512, and the test run must stay under ten minutes there).
    """
    from agents.data_sources import open_source
    from agents.lm.models import load_model
    from agents.solver import Solver, SolverConfig

    loaded = load_model("qwen2.5-coder-0.5b")
    bank = ExpertBank(loaded.model, BankConfig(n_experts=2, rank=8))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for layer in bank.layers.values():
            layer.lora_B[1].normal_(0, 0.02, generator=generator)
    questions = [p.question for p in open_source("test").take(2)]
    config = SolverConfig(max_new_tokens=24)
    plain = Solver(TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=4, engine="generate"), config)
    fast = Solver(TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=4), config)
    texts = []
    for weights in (None, bank.one_hot(1)):
        expected, got = plain.solve(questions, weights=weights), fast.solve(questions, weights=weights)
        texts.append([a.text for a in got])
        assert texts[-1] == [a.text for a in expected], weights
    bare, mixed = texts
    assert bare != mixed  # the mixture reaches the answers
