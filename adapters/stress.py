"""Stress controller after the Unified-LoRA design (https://github.com/Sva76/Unified-LoRa).

An exponential moving average of the training loss, E(t), is squashed into
phi(t) = E / (1 + E) in [0, 1). Two thresholds split phi into three modes:

- Single (phi < theta_single): little stress; train the shared expert.
- Multi (theta_single <= phi < theta_mirror): train the task's own expert.
- Mirror (phi >= theta_mirror): high stress; snapshot the bank first and roll the update
  back if it makes the guarded loss worse, with a cautious learning rate.

Each mode sets the learning rate. The state is a small dict saved with the bank.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum

from agents.errors import TrainingError


class StressMode(str, Enum):
    SINGLE = "single"
    MULTI = "multi"
    MIRROR = "mirror"


@dataclass
class StressConfig:
    ema_beta: float = 0.9  # EMA smoothing of the loss; higher = slower to react
    loss_scale: float = 1.0  # loss that maps to phi = 0.5 (E = loss / loss_scale)
    theta_single: float = 0.3  # phi below this: Single mode
    theta_mirror: float = 0.7  # phi at or above this: Mirror mode
    lr_single: float = 1e-4  # learning rate in Single mode (shared expert, small steps)
    lr_multi: float = 5e-4  # learning rate in Multi mode (task expert)
    lr_mirror: float = 1e-4  # learning rate in Mirror mode (cautious, with rollback)
    rollback_tolerance: float = 0.0  # Mirror rolls back if the guarded loss rises by more than this

    def __post_init__(self) -> None:
        if not 0.0 <= self.ema_beta < 1.0:
            raise ValueError(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.loss_scale <= 0:
            raise ValueError(f"loss_scale must be > 0, got {self.loss_scale}")
        if not 0.0 < self.theta_single < self.theta_mirror < 1.0:
            raise ValueError(
                f"need 0 < theta_single < theta_mirror < 1, got {self.theta_single}, {self.theta_mirror}"
            )
        for name in ("lr_single", "lr_multi", "lr_mirror"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rollback_tolerance < 0:
            raise ValueError(f"rollback_tolerance must be >= 0, got {self.rollback_tolerance}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StressDecision:
    mode: StressMode
    phi: float
    lr: float
    snapshot: bool  # take a snapshot before updating, and allow rollback


class StressController:
    def __init__(self, config: StressConfig | None = None):
        self.config = config or StressConfig()
        self.ema: float | None = None  # None until the first observation
        self.steps = 0

    def observe(self, loss: float) -> float:
        """Feed one loss value; returns the new phi."""
        if not math.isfinite(loss) or loss < 0:
            raise TrainingError(f"stress controller got an invalid loss {loss!r}")
        scaled = loss / self.config.loss_scale
        beta = self.config.ema_beta
        self.ema = scaled if self.ema is None else beta * self.ema + (1.0 - beta) * scaled
        self.steps += 1
        return self.phi

    @property
    def phi(self) -> float:
        return 0.0 if self.ema is None else self.ema / (1.0 + self.ema)

    def decide(self) -> StressDecision:
        phi, cfg = self.phi, self.config
        if phi >= cfg.theta_mirror:
            return StressDecision(StressMode.MIRROR, phi, cfg.lr_mirror, snapshot=True)
        if phi >= cfg.theta_single:
            return StressDecision(StressMode.MULTI, phi, cfg.lr_multi, snapshot=False)
        return StressDecision(StressMode.SINGLE, phi, cfg.lr_single, snapshot=False)

    def state_dict(self) -> dict:
        return {"ema": self.ema, "steps": self.steps, "config": self.config.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        try:
            ema, steps = state["ema"], int(state["steps"])
        except (KeyError, TypeError, ValueError) as err:
            raise TrainingError(f"stress controller state is malformed: {state!r}") from err
        self.ema = None if ema is None else float(ema)
        self.steps = steps
