"""One call builds the adapter stack over a frozen model, the way PEFT's ``get_peft_model`` does.

The stack is the expert bank injected into the model, the router over the model's hidden
size, the stress controller, the trainer that updates bank and router under it, and the
bank folder bound to those parts. The loop's runner, the evaluation's single-LoRA arm and
the export command all build it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from adapters.bank import BankConfig, ExpertBank
from adapters.router import Router, RouterConfig
from adapters.store import BankStore
from adapters.stress import StressConfig, StressController
from adapters.trainer import TestTimeTrainer, TrainerConfig


@dataclass
class AdapterStack:
    bank: ExpertBank
    router: Router
    stress: StressController
    trainer: TestTimeTrainer
    store: BankStore | None  # None: a stack that is never saved


def build_adapters(
    model: nn.Module,
    tokenizer,
    bank: BankConfig,
    router: RouterConfig,
    *,
    stress: StressConfig | None = None,
    trainer: TrainerConfig | None = None,
    bank_dir: str | Path | None = None,
) -> AdapterStack:
    """Inject the bank into ``model`` (frozen) and build the router, stress controller, trainer and store."""
    expert_bank = ExpertBank(model, bank)
    device = next(model.parameters()).device
    expert_router = Router(model.config.hidden_size, expert_bank.n_experts, router).to(device)
    controller = StressController(stress)
    updater = TestTimeTrainer(model, tokenizer, expert_bank, expert_router, trainer, controller)
    store = BankStore(bank_dir, expert_bank, expert_router, controller) if bank_dir is not None else None
    return AdapterStack(expert_bank, expert_router, controller, updater, store)
