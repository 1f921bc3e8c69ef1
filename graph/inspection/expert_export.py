"""One expert of a run's saved bank, written as a PEFT LoRA folder (loads with ``peft.PeftModel``)."""

from __future__ import annotations

from pathlib import Path

from graph.inspection.run_folder import RunDirNotFound, check_run_folder, read_run_settings


def export_expert(run_dir: str | Path, expert: int, out: str | Path, *, loader=None) -> dict:
    """Write one expert of a run's saved bank as a PEFT LoRA folder.

    The bank is rebuilt on the run's model with the shapes in run.json (the router's from the
    bank manifest, which records the memory size it was built with), then ``bank/current`` is
    loaded, checked against those shapes, and the expert exported.
    """
    from adapters.bank import BankConfig
    from adapters.export import export_peft
    from adapters.router import RouterConfig
    from adapters.stack import build_adapters
    from adapters.store import read_manifest
    from agents.lm.models import load_model

    run_dir = Path(run_dir)
    check_run_folder(run_dir, "bank")
    settings = read_run_settings(run_dir)
    if not settings.get("model"):
        raise RunDirNotFound(f"{run_dir} has no run.json naming its model")
    manifest = read_manifest(Path(run_dir) / "bank" / "current")
    bank_config = BankConfig(**settings.get("bank", manifest["bank_config"]))
    if not 0 <= expert < bank_config.n_experts:
        raise ValueError(f"--expert must be in [0, {bank_config.n_experts}) for this run, got {expert}")
    loaded = (loader or load_model)(settings["model"])
    adapters = build_adapters(loaded.model, loaded.tokenizer, bank_config, RouterConfig(**manifest["router_config"]),
                              bank_dir=run_dir / "bank")
    bank = adapters.bank
    adapters.store.load()
    norm = float(bank.expert_norms()[expert])
    path = export_peft(bank, out, expert=expert, base_model_name_or_path=loaded.source)
    return {"out": str(path), "expert": expert, "model": settings["model"], "base_model": loaded.source,
            "rank": bank_config.rank, "layers": len(bank.layer_names), "trained": norm > 0, "b_norm": norm}
