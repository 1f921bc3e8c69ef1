"""Export one expert, or a fixed mixture folded into one LoRA, as a PEFT LoRA folder.

A mixture sum_n w_n * B_n A_n * s is itself a LoRA of rank k*r: stack the k active A_n
as rows of A', and the w_n-weighted B_n as columns of B'. With lora_alpha = s * k * r,
PEFT's scaling alpha / rank equals s again, so the folded adapter is exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save as save_safetensors

from adapters.bank import ExpertBank
from agents.errors import AdapterError
from agents.files import atomic_write_bytes

PEFT_PREFIX = "base_model.model."


def export_peft(
    bank: ExpertBank,
    out_dir: str | Path,
    *,
    expert: int | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write adapter_config.json + adapter_model.safetensors for one expert or a fixed mixture."""
    if (expert is None) == (weights is None):
        raise AdapterError("export needs exactly one of expert=K or weights=[...]")
    n = bank.n_experts
    if expert is not None:
        if not 0 <= expert < n:
            raise AdapterError(f"expert index {expert} is out of range [0, {n})")
        mix = torch.zeros(n)
        mix[expert] = 1.0
    else:
        mix = torch.as_tensor(weights, dtype=torch.float32).flatten()
        if mix.shape != (n,) or not torch.isfinite(mix).all():
            raise AdapterError(f"mixture weights must be {n} finite numbers, got {tuple(mix.shape)}")
    active = mix.nonzero().flatten()  # (k,)
    if active.numel() == 0:
        raise AdapterError("mixture weights are all zero: nothing to export")
    k, r = active.numel(), bank.config.rank
    tensors = {}
    with torch.no_grad():
        for name, layer in bank.layers.items():
            a = layer.lora_A[active].float().cpu()  # (k, r, in)
            b = layer.lora_B[active].float().cpu() * mix[active][:, None, None]  # (k, r, out)
            tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.reshape(k * r, layer.in_features).contiguous()  # (k*r, in)
            tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.permute(2, 0, 1).reshape(layer.out_features, k * r).contiguous()  # (out, k*r)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": k * r,
        "lora_alpha": bank.config.scaling * k * r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "target_modules": sorted(bank.layer_names),
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    atomic_write_bytes(out / "adapter_model.safetensors", save_safetensors(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(out / "adapter_config.json", json.dumps(config, indent=2).encode())
    return out
