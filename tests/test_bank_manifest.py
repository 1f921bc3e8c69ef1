"""The bank manifest's own checksum: a hand edit that is still valid JSON is refused."""

import json
import logging

import pytest
import torch

from adapters.bank import BankConfig, ExpertBank
from adapters.router import Router, RouterConfig
from adapters.store import (
    CHECKSUM_KEY,
    MANIFEST,
    BankStore,
    load_bank,
    manifest_checksum,
    read_manifest,
    save_bank,
)
from adapters.stress import StressController, StressMode
from agents.errors import AdapterFileError


def _make(tiny):
    bank = ExpertBank(tiny.model, BankConfig())
    router = Router(tiny.model.config.hidden_size, bank.n_experts, RouterConfig(memory_dim=4))
    return bank, router


def _calm_stress():
    stress = StressController()
    stress.observe(0.1)  # phi ~ 0.09: Single mode
    return stress


def _edit(path, change):
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))


def test_edited_stress_block_is_refused_naming_the_file(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router, _calm_stress())

    def stress_up(manifest):
        manifest["stress"].update(ema=5.0, steps=7)  # phi ~ 0.83: would switch to Mirror mode

    _edit(tmp_path / MANIFEST, stress_up)
    stress = _calm_stress()
    with pytest.raises(AdapterFileError) as err:
        load_bank(tmp_path, bank, router, stress)
    message = str(err.value)
    assert str(tmp_path / MANIFEST) in message
    assert "was edited or is corrupt" in message and "\n" not in message
    assert stress.decide().mode is StressMode.SINGLE  # refused before the stress state changed


def test_edited_config_field_is_refused(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router)

    def seed_changed(manifest):
        manifest["bank_config"]["seed"] += 1  # not a structural field, so only the checksum catches it

    _edit(tmp_path / MANIFEST, seed_changed)
    with pytest.raises(AdapterFileError, match="does not match its checksum"):
        read_manifest(tmp_path)


def test_untouched_save_loads_and_checksum_is_over_the_other_fields(tiny, tmp_path):
    bank, router = _make(tiny)
    written = save_bank(tmp_path, bank, router, _calm_stress(), extra={1: ("tuple",)})  # int key, tuple: JSON changes both
    on_disk = json.loads((tmp_path / MANIFEST).read_text())
    assert on_disk[CHECKSUM_KEY] == written[CHECKSUM_KEY] == manifest_checksum(on_disk)
    stress = StressController()
    manifest = load_bank(tmp_path, bank, router, stress)
    assert manifest[CHECKSUM_KEY] == written[CHECKSUM_KEY]
    assert stress.steps == 1


def test_removed_checksum_is_refused_but_a_version_1_manifest_loads_with_a_warning(tiny, tmp_path, caplog):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router)
    _edit(tmp_path / MANIFEST, lambda m: m.pop(CHECKSUM_KEY))
    with pytest.raises(AdapterFileError, match=f"'{CHECKSUM_KEY}' is missing"):
        read_manifest(tmp_path)
    # A bank saved before the checksum existed: format_version 1, no checksum field.
    _edit(tmp_path / MANIFEST, lambda m: m.update(format_version=1))
    with caplog.at_level(logging.WARNING, logger="adapters.store"):
        load_bank(tmp_path, bank, router)
    assert "without a checksum" in caplog.text


def test_lowering_the_version_does_not_skip_the_checksum(tiny, tmp_path):
    bank, router = _make(tiny)
    save_bank(tmp_path, bank, router)
    _edit(tmp_path / MANIFEST, lambda m: m.update(format_version=1))
    with pytest.raises(AdapterFileError, match="does not match its checksum"):
        read_manifest(tmp_path)


def test_snapshot_and_rollback_round_trip_with_checksums(tiny, tmp_path):
    bank, router = _make(tiny)
    stress = _calm_stress()
    store = BankStore(tmp_path, bank, router, stress)
    store.snapshot("calm")
    saved_b = {name: layer.lora_B.clone() for name, layer in bank.layers.items()}
    with torch.no_grad():
        for layer in bank.layers.values():
            layer.lora_B.add_(1.0)
    stress.observe(50.0)
    store.rollback("calm")
    assert all(torch.equal(layer.lora_B, saved_b[name]) for name, layer in bank.layers.items())
    assert stress.steps == 1 and stress.decide().mode is StressMode.SINGLE
    assert read_manifest(store.current)["extra"] == {"rolled_back_to": "calm"}  # the rewritten current verifies
    _edit(store.snapshot_root / "calm" / MANIFEST, lambda m: m["stress"].update(ema=5.0))
    with pytest.raises(AdapterFileError, match="calm.*was edited or is corrupt"):
        store.rollback("calm")
