"""In-memory snapshots of the bank, router and stress state, for a quick rollback."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from adapters.bank import ExpertBank
from adapters.router import Router
from adapters.stress import StressController


def bank_tensors(bank: ExpertBank) -> dict[str, torch.Tensor]:
    """The bank's tensors keyed '<layer>.lora_A' / '<layer>.lora_B' (live, not copies)."""
    tensors = {}
    for name, layer in bank.layers.items():
        tensors[f"{name}.lora_A"] = layer.lora_A  # (n, r, in)
        tensors[f"{name}.lora_B"] = layer.lora_B  # (n, r, out)
    return tensors


@dataclass
class BankSnapshot:
    bank: dict[str, torch.Tensor]
    router: dict[str, torch.Tensor]
    stress: dict | None

    @classmethod
    def capture(cls, bank: ExpertBank, router: Router, stress: StressController | None = None) -> "BankSnapshot":
        with torch.no_grad():
            return cls(
                bank={k: v.detach().clone() for k, v in bank_tensors(bank).items()},
                router={k: v.detach().clone() for k, v in router.state_dict().items()},
                stress=copy.deepcopy(stress.state_dict()) if stress is not None else None,
            )

    def restore(self, bank: ExpertBank, router: Router, stress: StressController | None = None) -> None:
        with torch.no_grad():
            for key, live in bank_tensors(bank).items():
                live.copy_(self.bank[key])
            router.load_state_dict(self.router)
        if stress is not None and self.stress is not None:
            stress.load_state_dict(self.stress)
