"""The LoRA expert bank, router, store and PEFT export on the tiny-random model."""

import json

import pytest
import torch

from adapters.bank import BankConfig, ExpertBank, LoRABankLinear
from adapters.export import export_peft
from adapters.router import Router, RouterConfig, context_features, routing_weights
from adapters.snapshot import BankSnapshot
from adapters.stack import build_adapters
from adapters.store import BankStore, load_bank, save_bank
from agents.errors import AdapterError, AdapterFileError


def _inputs(tokenizer, texts=("Tom has 3 apples and buys 5 more.", "What is 12 times 4?")):
    enc = tokenizer(list(texts), return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def _randomize_b(bank, seed=1, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)


def _make(tiny, **bank_kwargs):
    bank = ExpertBank(tiny.model, BankConfig(**bank_kwargs))
    router = Router(tiny.model.config.hidden_size, bank.n_experts, RouterConfig(memory_dim=4))
    return bank, router


def test_step_zero_equals_base_model(tiny):
    ids, mask = _inputs(tiny.tokenizer)
    with torch.no_grad():
        base = tiny.model(input_ids=ids, attention_mask=mask).logits
        bank, router = _make(tiny)
        feats = context_features(tiny.model, bank, ids, mask)
        for mode in ("dense", "top-k"):
            weights = router.weights(router(feats), mode=mode)
            with bank.route(weights):
                assert torch.equal(tiny.model(input_ids=ids, attention_mask=mask).logits, base)
        with bank.route(bank.one_hot(3, 2)):
            assert torch.equal(tiny.model(input_ids=ids, attention_mask=mask).logits, base)


def test_injects_every_linear_but_the_head(tiny):
    from agents.lm.models import load_model

    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny.model.modules()) - 1  # minus lm_head
    bank, _ = _make(tiny)
    assert len(bank.layer_names) == n_linear
    assert tiny.model.get_output_embeddings() is not None
    assert not isinstance(tiny.model.get_output_embeddings(), type(next(iter(bank.layers.values()))))
    only_q = ExpertBank(load_model("tiny-random").model, BankConfig(target_modules=["q_proj"]))
    assert only_q.layer_names and all(name.endswith(".q_proj") for name in only_q.layer_names)


def test_unknown_target_module_is_refused(tiny):
    with pytest.raises(AdapterError, match="not_a_layer"):
        ExpertBank(tiny.model, BankConfig(target_modules=["q_proj", "not_a_layer"]))


def test_bank_call_without_mixture_is_refused_and_context_does_not_leak(tiny):
    ids, mask = _inputs(tiny.tokenizer)
    bank, _ = _make(tiny)
    with bank.route(bank.one_hot(0, 2)):
        tiny.model(input_ids=ids, attention_mask=mask)
    with pytest.raises(AdapterError, match="without a mixture"):
        tiny.model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError):
        with bank.route(bank.one_hot(0, 2)):
            raise RuntimeError("boom")
    with pytest.raises(AdapterError, match="without a mixture"):
        tiny.model(input_ids=ids, attention_mask=mask)


def test_einsum_equals_naive_per_expert_reference(tiny):
    bank, _ = _make(tiny)
    _randomize_b(bank)
    layer = next(iter(bank.layers.values()))
    x = torch.randn(3, 5, layer.in_features)  # (batch, seq, in)
    weights = torch.softmax(torch.randn(3, bank.n_experts), dim=-1)  # (batch, n)
    weights[1, ::2] = 0.0  # a row with some experts off
    with torch.no_grad(), bank.route(weights):
        fast = layer(x)
    with torch.no_grad():
        naive = layer.base_layer(x)
        for b in range(3):
            for n in range(bank.n_experts):
                delta = x[b] @ layer.lora_A[n].T @ layer.lora_B[n] * layer.scaling  # (seq, out)
                naive[b] += weights[b, n] * delta
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)
    # the sparse path (only some experts active across the batch) gives the same numbers
    sparse = torch.zeros_like(weights)
    sparse[:, [2, 7]] = weights[:, [2, 7]]
    with torch.no_grad(), bank.route(sparse):
        got = layer(x)
    with torch.no_grad():
        want = layer.base_layer(x) + sum(
            sparse[:, n, None, None] * (x @ layer.lora_A[n].T @ layer.lora_B[n]) * layer.scaling for n in (2, 7)
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mixture_shape_errors(tiny):
    bank, _ = _make(tiny)
    with pytest.raises(AdapterError, match="shape"):
        with bank.route(torch.ones(2, bank.n_experts + 1)):
            pass
    with pytest.raises(AdapterError, match="NaN"):
        with bank.route(torch.full((1, bank.n_experts), float("nan"))):
            pass
    with pytest.raises(AdapterError, match="out of range"):
        bank.one_hot(bank.n_experts)


def test_router_weights_sum_to_one_and_top_k_has_k_nonzeros():
    logits = torch.randn(5, 16)
    dense = routing_weights(logits, mode="dense")
    torch.testing.assert_close(dense.sum(-1), torch.ones(5))
    assert (dense > 0).all()
    top = routing_weights(logits, mode="top-k", top_k=3)
    torch.testing.assert_close(top.sum(-1), torch.ones(5))
    assert ((top > 0).sum(-1) == 3).all()
    assert torch.equal(top.argmax(-1), logits.argmax(-1))
    forced = routing_weights(logits, mode="forced", forced_expert=4)
    assert torch.equal(forced, torch.nn.functional.one_hot(torch.full((5,), 4), 16).float())
    with pytest.raises(AdapterError, match="forced routing"):
        routing_weights(logits, mode="forced")


def test_prior_blends_into_posterior():
    logits = torch.zeros(1, 4)  # a router with no opinion
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(routing_weights(logits, prior=prior), prior[None])
    # a confident router and a prior: the posterior is their normalised product
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1]]))
    want = torch.tensor([0.7 * 0.1, 0.1 * 0.2, 0.1 * 0.3, 0.1 * 0.4])
    torch.testing.assert_close(routing_weights(logits, prior=prior), (want / want.sum())[None])
    with pytest.raises(AdapterError, match="prior"):
        routing_weights(logits, prior=torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_router_shapes_and_memory_features(tiny):
    bank, router = _make(tiny)
    ids, mask = _inputs(tiny.tokenizer)
    feats = context_features(tiny.model, bank, ids, mask)
    assert feats.shape == (2, tiny.model.config.hidden_size)
    zero_mem = router(feats)
    assert torch.equal(zero_mem, router(feats, torch.zeros(2, 4)))
    assert not torch.equal(zero_mem, router(feats, torch.ones(4)))
    with pytest.raises(AdapterError, match="memory features"):
        router(feats, torch.zeros(2, 5))


def test_context_features_ignore_padding(tiny):
    bank, _ = _make(tiny)
    text = "Tom has 3 apples."
    alone = _inputs(tiny.tokenizer, (text,))
    padded = _inputs(tiny.tokenizer, (text, text + " He buys 5 more apples at the shop."))
    f_alone = context_features(tiny.model, bank, *alone)
    f_padded = context_features(tiny.model, bank, *padded)
    torch.testing.assert_close(f_alone[0], f_padded[0], rtol=1e-4, atol=1e-5)


def _assert_same_state(bank_a, router_a, bank_b, router_b):
    for (name, la), lb in zip(bank_a.layers.items(), bank_b.layers.values()):
        assert torch.equal(la.lora_A, lb.lora_A), name
        assert torch.equal(la.lora_B, lb.lora_B), name
    for (k, va), vb in zip(router_a.state_dict().items(), router_b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    from agents.lm.models import load_model

    bank, router = _make(tiny)
    _randomize_b(bank)
    manifest = save_bank(tmp_path / "bank", bank, router, extra={"model": "tiny-random"})
    assert set(manifest["files"]) == {"bank", "router"}
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    other = load_model("tiny-random")
    bank2 = ExpertBank(other.model, BankConfig(seed=99))
    router2 = Router(other.model.config.hidden_size, bank2.n_experts, RouterConfig(memory_dim=4, seed=5))
    load_bank(tmp_path / "bank", bank2, router2)
    _assert_same_state(bank, router, bank2, router2)
    ids, mask = _inputs(tiny.tokenizer)
    with torch.no_grad(), bank.route(bank.one_hot(1, 2)):
        a = tiny.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad(), bank2.route(bank2.one_hot(1, 2)):
        b = other.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def test_save_is_content_addressed_and_leaves_no_temp_files(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router)
    _randomize_b(bank)
    save_bank(tmp_path, bank, router)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.startswith("bank-")]) == 1  # the stale one was removed
    assert not [n for n in names if ".tmp" in n]


def test_snapshot_and_rollback_round_trip(tiny, tmp_path):
    bank, router = _make(tiny)
    store = BankStore(tmp_path, bank, router)
    _randomize_b(bank, seed=1)
    before = BankSnapshot.capture(bank, router)
    store.snapshot("s1")
    _randomize_b(bank, seed=2)
    store.snapshot("s2")
    assert store.snapshots() == ["s1", "s2"]
    store.rollback("s1")
    for key, tensor in before.bank.items():
        live = dict(bank.layers)[key.rsplit(".", 1)[0]]
        assert torch.equal(getattr(live, key.rsplit(".", 1)[1]), tensor)
    assert store.exists()  # the rolled-back state is the current one on disk
    with pytest.raises(AdapterFileError, match="no snapshot named 'nope'"):
        store.rollback("nope")
    with pytest.raises(AdapterFileError, match="bad snapshot name"):
        store.snapshot("../escape")


def test_in_memory_snapshot_restores_exactly(tiny):
    bank, router = _make(tiny)
    snap = BankSnapshot.capture(bank, router)
    _randomize_b(bank)
    with torch.no_grad():
        router.net[1].weight.add_(1.0)
    snap.restore(bank, router)
    assert all(torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B)) for layer in bank.layers.values())
    assert torch.equal(router.net[1].weight, snap.router["net.1.weight"])


def test_corrupt_manifest_is_refused(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router)
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(AdapterFileError, match="manifest.json is corrupt"):
        load_bank(tmp_path, bank, router)


def test_corrupt_tensor_file_is_refused_and_live_bank_untouched(tiny, tmp_path):
    bank, router = _make(tiny)
    _randomize_b(bank)
    save_bank(tmp_path, bank, router)
    bank_file = next(tmp_path.glob("bank-*.safetensors"))
    data = bytearray(bank_file.read_bytes())
    data[-10] ^= 0xFF
    bank_file.write_bytes(bytes(data))
    live = BankSnapshot.capture(bank, router)
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B.add_(1.0)
    expected = BankSnapshot.capture(bank, router)
    with pytest.raises(AdapterFileError, match="sha256 does not match"):
        load_bank(tmp_path, bank, router)
    assert all(torch.equal(expected.bank[k], v) for k, v in BankSnapshot.capture(bank, router).bank.items())
    assert live is not None


def test_missing_file_and_mismatched_config_are_refused(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path / "a", bank, router)
    next((tmp_path / "a").glob("router-*.safetensors")).unlink()
    with pytest.raises(AdapterFileError, match="is missing"):
        load_bank(tmp_path / "a", bank, router)
    from agents.lm.models import load_model

    other = load_model("tiny-random")
    small = ExpertBank(other.model, BankConfig(n_experts=4))
    small_router = Router(other.model.config.hidden_size, 4, RouterConfig(memory_dim=4))
    save_bank(tmp_path / "b", bank, router)
    with pytest.raises(AdapterFileError, match="does not match this model and config"):
        load_bank(tmp_path / "b", small, small_router)
    with pytest.raises(AdapterFileError, match="manifest.json is missing"):
        load_bank(tmp_path / "nowhere", bank, router)


@pytest.mark.parametrize("how", ["expert", "mixture"])
def test_peft_export_loads_and_matches(tiny, tmp_path, how):
    from peft import PeftModel

    from agents.lm.models import load_model

    base_dir = tmp_path / "base"
    tiny.model.save_pretrained(base_dir)
    tiny.tokenizer.save_pretrained(base_dir)
    bank, _ = _make(tiny)
    _randomize_b(bank, scale=0.2)
    if how == "expert":
        weights = bank.one_hot(5)
        export_peft(bank, tmp_path / "lora", expert=5, base_model_name_or_path=str(base_dir))
    else:
        weights = torch.zeros(1, bank.n_experts)
        weights[0, [1, 4, 9]] = torch.tensor([0.5, 0.3, 0.2])
        export_peft(bank, tmp_path / "lora", weights=weights[0], base_model_name_or_path=str(base_dir))
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == (8 if how == "expert" else 24)
    ids, mask = _inputs(tiny.tokenizer)
    with torch.no_grad(), bank.route(weights):
        ours = tiny.model(input_ids=ids, attention_mask=mask).logits
    fresh = load_model(str(base_dir))
    peft_model = PeftModel.from_pretrained(fresh.model, tmp_path / "lora").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), bank.bypass():
        base_logits = tiny.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(ours, base_logits, atol=1e-3)  # the adapter really does something


def test_export_argument_errors(tiny, tmp_path):
    bank, _ = _make(tiny)
    with pytest.raises(AdapterError, match="exactly one"):
        export_peft(bank, tmp_path, expert=1, weights=[1.0] * 16)
    with pytest.raises(AdapterError, match="all zero"):
        export_peft(bank, tmp_path, weights=[0.0] * 16)
    with pytest.raises(AdapterError, match="out of range"):
        export_peft(bank, tmp_path, expert=16)


def test_inference_factor_cache_sees_every_change_of_the_experts(tiny):
    bank, _ = _make(tiny)
    ids, mask = _inputs(tiny.tokenizer)
    weights = torch.zeros(2, bank.n_experts)
    weights[:, [1, 2]] = 0.5
    with torch.no_grad():
        with bank.route(weights):
            first = tiny.model(input_ids=ids, attention_mask=mask).logits
        _randomize_b(bank)  # the experts change in place between two calls: the gathered factors must follow
        with bank.route(weights):
            second = tiny.model(input_ids=ids, attention_mask=mask).logits
        with bank.route(weights):
            again = tiny.model(input_ids=ids, attention_mask=mask).logits  # reuses the gathered factors
    assert not torch.equal(first, second)
    assert torch.equal(second, again)


def test_untrained_experts_are_left_out_without_autograd_and_kept_with_it(tiny):
    bank, _ = _make(tiny)
    layer = next(iter(bank.layers.values()))
    x = torch.randn(2, 3, layer.in_features)  # (batch, seq, in)
    weights = torch.zeros(2, bank.n_experts)
    weights[0, [1, 4]], weights[1, [4, 6]] = 0.5, 0.5
    seen = []
    original = layer._factors
    layer._factors = lambda mixture: seen.append(mixture.active_key) or original(mixture)
    with torch.no_grad(), bank.route(weights):
        assert torch.equal(layer(x), layer.base_layer(x))  # a new bank: every expert untrained, nothing computed
        with torch.enable_grad(), pytest.raises(AdapterError, match="without autograd"):
            layer(x)  # the bare model would silently train nothing
    assert seen == []
    with torch.no_grad():
        layer.lora_B[4].normal_(0, 0.05, generator=torch.Generator().manual_seed(0))  # expert 4 alone trained
        assert bank.untrained().tolist() == [n != 4 for n in range(bank.n_experts)]  # the change is seen
        with bank.route(weights):
            got = layer(x)
        want = layer.base_layer(x) + 0.5 * (x @ layer.lora_A[4].T @ layer.lora_B[4]) * layer.scaling
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert seen == [(4,)]
    with bank.route(weights):  # autograd on: untrained experts keep their gradient path
        layer(x).sum().backward()
    assert seen[-1] == (1, 4, 6) and layer.lora_B.grad[1].abs().sum() > 0
    with torch.no_grad(), bank.route(weights), torch.enable_grad():
        with pytest.raises(AdapterError, match="without autograd"):
            layer(x)


def test_reduced_precision_inference_adds_the_delta_in_the_models_dtype_and_follows_changes():
    from agents.lm.models import load_model

    model = load_model("tiny-random", dtype="bfloat16").model
    bank = ExpertBank(model, BankConfig(n_experts=4))
    _randomize_b(bank, scale=0.5)
    layer = next(iter(bank.layers.values()))
    x = torch.randn(3, 5, layer.in_features).to(torch.bfloat16)  # (batch, seq, in)
    weights = torch.tensor([[0.5, 0.5, 0, 0], [0, 0.3, 0.7, 0], [1.0, 0, 0, 0]])

    def reference():  # the float32 delta of every routed expert, added to the base output
        delta = sum(weights[:, n, None, None] * (x.float() @ layer.lora_A[n].T @ layer.lora_B[n]) * layer.scaling
                    for n in range(4))
        return layer.base_layer(x).float() + delta

    def close_to_reference(out):  # within bfloat16 rounding of the output's scale
        want = reference()
        return float((out.float() - want).abs().max()) <= 1e-2 * float(want.abs().max())

    with torch.no_grad(), bank.route(weights):
        got = layer(x)
        assert got.dtype == torch.bfloat16 and layer._cast is not None  # the fused path ran
        assert close_to_reference(got)
        assert not torch.allclose(got.float(), layer.base_layer(x).float(), atol=1e-2)  # the delta is there
        layer.lora_B.mul_(2.0)  # an in-place change: the factors kept in bfloat16 must follow it
        again = layer(x)
        assert close_to_reference(again) and not torch.equal(again, got)
    with bank.route(weights):  # with autograd: the float32 path, gradients reach the adapters
        layer(x).float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad[1].abs().sum() > 0


def test_build_adapters_makes_one_stack_whose_store_is_bound_to_its_parts(tiny, tmp_path):
    stack = build_adapters(tiny.model, tiny.tokenizer, BankConfig(n_experts=4, rank=2), RouterConfig(memory_dim=4),
                           bank_dir=tmp_path / "bank")
    assert stack.trainer.bank is stack.bank and stack.trainer.router is stack.router
    assert stack.trainer.stress is stack.stress and stack.store.stress is stack.stress
    assert isinstance(tiny.model.get_submodule(stack.bank.layer_names[0]), LoRABankLinear)
    _randomize_b(stack.bank, seed=3)
    stack.store.save()
    saved = {name: layer.lora_B.clone() for name, layer in stack.bank.layers.items()}
    _randomize_b(stack.bank, seed=4)
    stack.store.load()  # restores the bound bank in place
    assert all(torch.equal(layer.lora_B, saved[name]) for name, layer in stack.bank.layers.items())
