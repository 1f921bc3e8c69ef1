"""The llama.cpp backend: GGUF LoRA files, greedy equivalence with the torch backend, mixtures.

The tiny model is written as a float32 GGUF, and llama.cpp runs it with an f32 KV cache and
flash attention off: then its logits agree with torch's to about 1e-6 and greedy outputs
must be token-identical. (With flash attention, which computes in f16 on CPU, near-ties of
5e-4 in the random model's flat logits flip.)
"""

import pytest
import torch

pytest.importorskip("xllamacpp")

from gguf import GGUFReader  # noqa: E402

from adapters.bank import BankConfig, ExpertBank  # noqa: E402
from adapters.gguf_lora import (  # noqa: E402
    GgufBase,
    expert_tensors,
    export_expert_loras,
    write_dense_gguf,
    write_llama_gguf,
)
from agents.lm.backend import BackendError, TorchBackend, make_backend
from agents.lm.generation import (  # noqa: E402
    GREEDY,
    AnswerLineComplete,
    Request,
    Sampling,
)
from agents.lm.llamacpp import LlamaCppBackend, LlamaCppConfig  # noqa: E402
from agents.lm.llamacpp_tokens import TokenStream, segment  # noqa: E402
from agents.lm.models import load_model  # noqa: E402

QUESTIONS = [
    "How many clips did Natalia sell?",
    "Betty has 3 apples and buys 5 more.",
    "What is 12 / 60?",
    "Weng earns $12 an hour.",
]
EXACT = LlamaCppConfig(threads=2, parallel=4, ctx_per_sequence=256, kv_cache="f32", flash_attention="off")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The tiny model as a float32 GGUF (the model is seeded, so every fresh load matches it)."""
    loaded = load_model("tiny-random")
    return write_llama_gguf(loaded.model, loaded.tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture
def tiny_bank():
    """A fresh tiny model with 4 experts: expert 0 untrained (B = 0), experts 1-3 random."""
    loaded = load_model("tiny-random")
    bank = ExpertBank(loaded.model, BankConfig(n_experts=4, rank=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[1:].normal_(0, 0.5, generator=generator)
    return loaded, bank


@pytest.fixture
def backends(tiny_gguf, tiny_bank, tmp_path):
    loaded, bank = tiny_bank
    fast = LlamaCppBackend(tiny_gguf, loaded.tokenizer, bank, EXACT)
    yield TorchBackend(loaded.model, loaded.tokenizer, bank), fast, bank
    fast.close()


def _prompts(backend):
    return [backend.chat_prompt(None, q) for q in QUESTIONS]


def _same(a, b):
    return [(x.text, x.new_tokens) for x in a] == [(y.text, y.new_tokens) for y in b]


# --- GGUF LoRA files -------------------------------------------------------------------------


def test_lora_file_follows_llama_cpp_layout(tiny_gguf, tiny_bank, tmp_path):
    loaded, bank = tiny_bank
    base = GgufBase.read(tiny_gguf)
    assert (base.arch, base.n_blocks, base.n_head, base.n_head_kv) == ("llama", 2, 4, 2)
    files = export_expert_loras(bank, tmp_path, base)
    assert sorted(files) == [1, 2, 3]  # expert 0 has B = 0: no file, no adapter
    reader = GGUFReader(files[2])
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == pytest.approx(bank.config.alpha)
    assert reader.fields["general.architecture"].contents() == "llama"
    tensors = {t.name: t for t in reader.tensors}
    layer = bank.layers["model.layers.1.mlp.down_proj"]
    a, b = tensors["blk.1.ffn_down.weight.lora_a"], tensors["blk.1.ffn_down.weight.lora_b"]
    assert list(a.shape) == [layer.in_features, 4] and list(b.shape) == [4, layer.out_features]  # ggml order
    assert torch.equal(torch.from_numpy(a.data.copy()), layer.lora_A[2])
    assert torch.equal(torch.from_numpy(b.data.copy()), layer.lora_B[2].T)
    assert len(tensors) == 2 * len(bank.layers)


def test_q_and_k_deltas_are_permuted_like_the_model(tiny_bank):
    """llama arch: lora_b rows follow the converter's q/k permutation, so B'A = permute(BA)."""
    loaded, bank = tiny_bank
    base = GgufBase.of_model(loaded.model.config)
    tensors = expert_tensors(bank, 1, base)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        layer = bank.layers[name]
        key = base.tensor_name(name)
        folded = torch.from_numpy(tensors[f"{key}.lora_b"]) @ torch.from_numpy(tensors[f"{key}.lora_a"])
        delta = layer.lora_B[1].T @ layer.lora_A[1]  # (out, in)
        assert torch.allclose(folded, base.permute_rows(name, delta), atol=1e-6)
        assert not torch.allclose(folded, delta)  # the permutation is not the identity


def test_unchanged_experts_are_not_rewritten(tiny_bank, tmp_path):
    loaded, bank = tiny_bank
    base = GgufBase.of_model(loaded.model.config)
    first = export_expert_loras(bank, tmp_path, base)
    stamps = {e: p.stat().st_mtime_ns for e, p in first.items()}
    with torch.no_grad():
        bank.layers["model.layers.0.self_attn.v_proj"].lora_B[3] += 0.1
    second = export_expert_loras(bank, tmp_path, base)
    assert second[1] == first[1] and second[1].stat().st_mtime_ns == stamps[1]
    assert second[3] != first[3]  # content-named: a changed expert is a new file


def test_dense_copy_keeps_metadata_and_values(tiny_gguf, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType

    dense = write_dense_gguf(tiny_gguf, tmp_path / "tiny-f16.gguf", "f16")
    src, out = GGUFReader(tiny_gguf), GGUFReader(dense)
    assert {k: f.contents() for k, f in src.fields.items() if k.startswith("llama.")} == {
        k: f.contents() for k, f in out.fields.items() if k.startswith("llama.")
    }
    assert out.fields["tokenizer.ggml.tokens"].contents() == src.fields["tokenizer.ggml.tokens"].contents()
    pairs = {t.name: t for t in src.tensors}
    for tensor in out.tensors:
        original = pairs[tensor.name]
        expected = GGMLQuantizationType.F16 if len(original.shape) == 2 else GGMLQuantizationType.F32
        assert tensor.tensor_type == expected
        assert np.allclose(tensor.data.astype(np.float32), original.data, atol=1e-3)


def test_q8_0_copy_quantizes_the_matrices_in_blocks_of_32(tiny_gguf, tmp_path):
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    q8 = write_dense_gguf(tiny_gguf, tmp_path / "tiny-q8.gguf", "q8_0")
    pairs = {t.name: t for t in GGUFReader(tiny_gguf).tensors}
    kinds = set()
    for tensor in GGUFReader(q8).tensors:
        original = np.asarray(pairs[tensor.name].data, dtype=np.float32)
        kinds.add(tensor.tensor_type)
        if len(original.shape) == 1 or original.shape[-1] % 32:
            assert tensor.tensor_type == GGMLQuantizationType.F32
            assert np.array_equal(tensor.data, original)
            continue
        assert tensor.tensor_type == GGMLQuantizationType.Q8_0
        values = dequantize(tensor.data, tensor.tensor_type).reshape(original.shape)
        blocks = original.reshape(-1, 32)
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127  # one int8 step per block
        error = np.abs(values.reshape(-1, 32) - blocks)
        assert (error <= 0.57 * step + 1e-12).all()  # half a step, plus up to 127 x the f16 scale's error (2^-11)
    assert GGMLQuantizationType.Q8_0 in kinds


def test_unsupported_architecture_is_refused():
    from agents.errors import AdapterError

    with pytest.raises(AdapterError, match="architectures"):
        GgufBase("gemma", 2, 4, 4)


# --- greedy equivalence with the torch backend --------------------------------------------------


def test_greedy_is_token_identical_bare_and_under_mixtures(backends):
    ref, fast, bank = backends
    prompts = _prompts(ref)
    mixtures = [
        None,
        bank.one_hot(1),
        torch.tensor([[0.0, 0.5, 0.3, 0.2]]),
        torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0.5, 0.5, 0]]),  # one row per prompt
    ]
    for weights in mixtures:
        expected = ref.generate(prompts, weights=weights, max_new_tokens=40)
        got = fast.generate(prompts, weights=weights, max_new_tokens=40)
        assert _same(expected, got), f"weights {weights}"
    assert fast.loaded_experts == [1, 2, 3]


def test_a_changed_mixture_changes_the_output_in_both(backends):
    ref, fast, bank = backends
    prompts = _prompts(ref)[:2]
    outputs = {}
    for name, backend in (("torch", ref), ("llama.cpp", fast)):
        outputs[name] = [backend.generate(prompts, weights=bank.one_hot(e), max_new_tokens=24) for e in (1, 2)]
        assert [g.text for g in outputs[name][0]] != [g.text for g in outputs[name][1]], name
    assert all(_same(a, b) for a, b in zip(outputs["torch"], outputs["llama.cpp"]))


def test_prompt_cache_is_not_reused_across_mixtures(backends):
    """llama.cpp would reuse a slot's cached prompt computed under other LoRA scales; we must not."""
    ref, fast, bank = backends
    prompts = _prompts(ref)
    first = fast.generate(prompts, weights=bank.one_hot(1), max_new_tokens=16)
    other = fast.generate(prompts, weights=bank.one_hot(2), max_new_tokens=16)
    again = fast.generate(prompts, weights=bank.one_hot(1), max_new_tokens=16)
    assert _same(first, again)
    assert _same(other, ref.generate(prompts, weights=bank.one_hot(2), max_new_tokens=16))


def test_training_the_bank_reaches_llama_cpp(backends):
    """An in-place update of the bank (what an optimizer step does) rewrites the adapters."""
    ref, fast, bank = backends
    prompts = _prompts(ref)[:2]
    weights = bank.one_hot(0)
    before = fast.generate(prompts, weights=weights, max_new_tokens=24)
    assert _same(before, fast.generate(prompts, max_new_tokens=24))  # expert 0 is untrained: bare model
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B[0].normal_(0, 0.5, generator=generator)
    after = fast.generate(prompts, weights=weights, max_new_tokens=24)
    assert not _same(before, after)
    assert _same(after, ref.generate(prompts, weights=weights, max_new_tokens=24))
    assert fast.loaded_experts == [0, 1, 2, 3]
    assert len(list(fast._adapter_dir.glob("expert*.gguf"))) == 4  # files of the old bank state pruned


def test_sampling_repeats_with_its_seed(backends):
    ref, fast, bank = backends
    prompts = _prompts(ref)[:2]
    hot = Sampling(temperature=1.0, top_p=0.95, seed=3)
    first = fast.generate(prompts, weights=bank.one_hot(1), max_new_tokens=16, sampling=hot)
    assert _same(first, fast.generate(prompts, weights=bank.one_hot(1), max_new_tokens=16, sampling=hot))
    greedy = fast.generate(prompts, weights=bank.one_hot(1), max_new_tokens=16)
    assert not _same(first, greedy)


def test_requests_served_together_equal_each_served_alone(backends):
    """A round's pooled call: each request's rows keep its mixture, cap, stop and seeds."""
    ref, fast, bank = backends
    prompts = _prompts(ref)
    hot = Sampling(temperature=1.0, top_p=0.95, seed=5)
    requests = [
        Request(tuple(prompts[:2]), bank.one_hot(1), 24, False, GREEDY),
        Request(tuple(prompts[1:]), torch.tensor([[0.0, 0.5, 0.3, 0.2]]), 12, False, hot),
        Request(tuple(prompts[:1]), None, 30, True, GREEDY),
        Request((), None, 8, False, GREEDY),
    ]
    together = fast.generate_requests(requests)
    assert [len(out) for out in together] == [2, len(prompts) - 1, 1, 0]
    for request, out in zip(requests, together):
        alone = fast.generate(list(request.prompts), weights=request.weights, max_new_tokens=request.max_new_tokens,
                              stop_at_answer=request.stop_at_answer, sampling=request.sampling)
        assert _same(out, alone)
    assert _same(together[0], ref.generate(prompts[:2], weights=bank.one_hot(1), max_new_tokens=24))
    assert _same(together[0], fast.generate(prompts[:2], weights=bank.one_hot(1)[0], max_new_tokens=24))  # 1-D mixture


# --- the token stream: answer-line stop and held-back tokens -----------------------------------


class _FakeBackend:
    """What TokenStream reads from its backend, with the tiny tokenizer."""

    def __init__(self, tokenizer):
        from agents.lm.llamacpp_tokens import byte_tables

        self.tokenizer = tokenizer
        self._token_bytes, self._bytes_token = byte_tables(tokenizer)


def _frame(item_id, item_bytes, count, finish=None):
    content = [] if item_id is None else [{"id": item_id, "bytes": list(item_bytes)}]
    return {"choices": [{"logprobs": {"content": content}, "finish_reason": finish}], "timings": {"predicted_n": count}}


def test_stream_stops_where_the_torch_criterion_stops():
    tokenizer = load_model("tiny-random").tokenizer
    fake = _FakeBackend(tokenizer)
    ids = tokenizer("She sold 48 clips. The answer is 72.\nThen more text follows here", add_special_tokens=False)["input_ids"]
    stream = TokenStream(fake, max_new_tokens=100, stop_at_answer=True)
    for n, token in enumerate(ids, start=1):
        if stream.on_frame(_frame(token, fake._token_bytes[token], n)):
            break
    criterion = AnswerLineComplete(tokenizer, prompt_width=0)
    torch_stop = next(n for n in range(1, len(ids) + 1) if criterion(torch.tensor([ids[:n]]), None)[0])
    assert stream.ids == ids[:torch_stop]
    assert tokenizer.decode(stream.ids).endswith("The answer is 72.\n")


def test_held_back_tokens_are_recovered_from_the_frame_bytes():
    """The server sends no frame for a token that ends mid-character; the next frame's bytes hold it."""
    tokenizer = load_model("tiny-random").tokenizer
    fake = _FakeBackend(tokenizer)
    by_bytes = fake._bytes_token
    lead, cont, word = by_bytes[b"\xc3"], by_bytes[b"\xa9"], tokenizer(" clips", add_special_tokens=False)["input_ids"]
    assert len(word) == 1
    stream = TokenStream(fake, max_new_tokens=100, stop_at_answer=False)
    stream.on_frame(_frame(word[0], b" clips", 1))
    # The lead byte of "é" is held back; the frame of the continuation byte carries both bytes.
    stream.on_frame(_frame(cont, b"\xc3\xa9", 3))
    assert stream.ids == [word[0], lead, cont]
    assert segment(b"\xc3\xa9", 2, by_bytes) == [lead, cont]
    assert segment(b"\xc3\xa9", 5, by_bytes) is None


def test_stream_reports_server_errors():
    fake = _FakeBackend(load_model("tiny-random").tokenizer)
    stream = TokenStream(fake, max_new_tokens=10, stop_at_answer=False)
    assert stream.on_frame({"error": {"message": "context exceeded"}}) is True
    assert "context exceeded" in stream.error


# --- errors and selection ---------------------------------------------------------------------


def test_bad_requests_fail_loudly(backends):
    ref, fast, bank = backends
    prompts = _prompts(ref)[:2]
    with pytest.raises(BackendError, match="shape"):
        fast.generate(prompts, weights=torch.ones(3, bank.n_experts))
    with pytest.raises(BackendError, match="NaN"):
        fast.generate(prompts, weights=torch.full((1, bank.n_experts), float("nan")))
    with pytest.raises(BackendError, match="ctx_per_sequence"):
        fast.generate(prompts, max_new_tokens=1000)
    with pytest.raises(ValueError, match="kv_cache"):
        LlamaCppConfig(kv_cache="q4")


def test_missing_gguf_is_an_error(tiny_bank, tmp_path):
    loaded, bank = tiny_bank
    with pytest.raises(BackendError, match="does not exist"):
        LlamaCppBackend(tmp_path / "none.gguf", loaded.tokenizer, bank)


def test_make_backend_selects_by_name_and_auto(tiny_bank, tiny_gguf):
    loaded, bank = tiny_bank
    assert make_backend("torch", loaded, bank).name == "torch"
    assert make_backend("auto", loaded, bank).name == "torch"
    with pytest.raises(BackendError, match="no GGUF"):
        make_backend("llama.cpp", loaded, bank)
    with pytest.raises(BackendError, match="unknown backend"):
        make_backend("vllm", loaded, bank)
    loaded.gguf_path = tiny_gguf
    assert make_backend("auto", loaded, bank).name == "torch"  # a GGUF does not change auto: torch is faster
    backend = make_backend("llama.cpp", loaded, bank)
    try:
        assert backend.name == "llama.cpp" and backend.bank is bank
        assert "serving tiny.gguf," in backend.description  # an f32 GGUF is served as it is, not copied
    finally:
        backend.close()


# --- the real model (slow) ---------------------------------------------------------------------


@pytest.mark.slow
def test_qwen_llama_cpp_gives_the_same_final_answers_as_torch():
    """A short word problem: the same final answer as torch, and a mixture changes both backends."""
    from agents.solver import Solver, SolverConfig

    loaded = load_model("qwen2.5-coder-0.5b")
    if loaded.gguf_path is None:
        pytest.skip("the Qwen GGUF is not in the cache")
    # One short problem: on an AVX2-only CPU torch decodes one row at a few tokens/s, and a GSM8K
    # answer of about 210 tokens took most of this test's three minutes; the run must stay under ten.
    questions = ["Tom has 3 boxes with 12 pencils in each box. He gives away 9 pencils. How many pencils does he have left?"]
    bank = ExpertBank(loaded.model, BankConfig(n_experts=2, rank=8))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for layer in bank.layers.values():
            layer.lora_B[1].normal_(0, 0.02, generator=generator)
    ref = TorchBackend(loaded.model, loaded.tokenizer, bank)
    with LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, bank, LlamaCppConfig(threads=2)) as fast:
        config = SolverConfig(max_new_tokens=288)
        expected = Solver(ref, config).solve(questions)
        got = Solver(fast, config).solve(questions)
        assert [a.answer for a in got] == [a.answer for a in expected]
        assert expected[0].answer is not None  # an answer line was found, so the comparison says something

        prompt = [ref.chat_prompt(None, "Write one sentence about the sea.")]
        for backend in (ref, fast):
            bare = backend.generate(prompt, max_new_tokens=24)[0].text
            mixed = backend.generate(prompt, weights=bank.one_hot(1), max_new_tokens=24)[0].text
            assert bare != mixed, backend.name
