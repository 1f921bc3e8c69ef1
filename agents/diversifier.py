"""The diversifier: one rule becomes several differently shaped training texts.

Shapes: the principle explained; a worked example on a new problem the model writes; a
checklist; a contrast between a correct step and a typical wrong one. Each text passes the
answer-leak guard, or is regenerated (sampled) a bounded number of times, or dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from adapters.trainer import TrainingExample
from agents.backend import GenerationBackend, Sampling
from agents.errors import SelfImproveError
from agents.guard import leaks_answer
from agents.prompts import (
    DIVERSIFY_REQUEST,
    DIVERSIFY_SHAPES,
    DIVERSIFY_SYSTEM,
    DIVERSIFY_TRAIN_PROMPT,
    SOLVER_SYSTEM,
    SOLVER_USER,
)

_PROBLEM = re.compile(r"Problem:\s*(.+?)\n\s*\n(.+)", re.DOTALL | re.IGNORECASE)


class DiversifyError(SelfImproveError):
    """Not one training text survived the guard."""


@dataclass
class DiversifierConfig:
    shapes: tuple[str, ...] = DIVERSIFY_SHAPES  # which shapes to write
    max_new_tokens: int = 256  # generation cap per text
    max_attempts: int = 2  # tries per shape before the shape is dropped
    min_chars: int = 20  # shorter texts are dropped as empty
    retry_temperature: float = 0.7

    def __post_init__(self) -> None:
        unknown = set(self.shapes) - set(DIVERSIFY_SHAPES)
        if unknown or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {DIVERSIFY_SHAPES}, got {self.shapes}")
        for name in ("max_new_tokens", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class TrainingText:
    shape: str
    prompt: str  # chat-templated prompt; masked out of the loss
    completion: str  # what the adapters learn to write

    def example(self) -> TrainingExample:
        return TrainingExample(self.prompt, self.completion)


@dataclass
class Diversification:
    texts: list[TrainingText]
    dropped: dict[str, str] = field(default_factory=dict)  # shape -> why it was dropped


class Diversifier:
    def __init__(self, backend: GenerationBackend, config: DiversifierConfig | None = None):
        self.backend = backend
        self.config = config or DiversifierConfig()

    def _train_pair(self, shape: str, rule: str, text: str) -> tuple[str, str]:
        if shape == "worked_example" and (match := _PROBLEM.search(text)):
            # The new problem in the solver's own prompt format, so the lesson transfers to solving.
            question, solution = match.group(1).strip(), match.group(2).strip()
            return self.backend.chat_prompt(SOLVER_SYSTEM, SOLVER_USER.format(rules="", question=question)), solution
        return self.backend.chat_prompt(None, DIVERSIFY_TRAIN_PROMPT[shape].format(rule_topic=rule)), text.strip()

    def diversify(self, rule: str, *, label: str | None, seed: int = 0) -> Diversification:
        """Training texts for a rule; ``label`` feeds only the leak guard."""
        cfg = self.config
        pending = list(cfg.shapes)
        texts: dict[str, TrainingText] = {}
        dropped: dict[str, str] = {}
        for attempt in range(1, cfg.max_attempts + 1):
            if not pending:
                break
            sampling = Sampling() if attempt == 1 else Sampling(temperature=cfg.retry_temperature, seed=seed + attempt)
            prompts = [self.backend.chat_prompt(DIVERSIFY_SYSTEM, DIVERSIFY_REQUEST[s].format(rule=rule)) for s in pending]
            outputs = self.backend.generate(prompts, max_new_tokens=cfg.max_new_tokens, sampling=sampling)
            still = []
            for shape, out in zip(pending, outputs):
                prompt, completion = self._train_pair(shape, rule, out.text)
                if len(completion) < cfg.min_chars:
                    dropped[shape] = "the text was empty or too short"
                    still.append(shape)
                elif leaks_answer(prompt + "\n" + completion, label):
                    dropped[shape] = "the text contained the problem's answer"
                    still.append(shape)
                else:
                    texts[shape] = TrainingText(shape, prompt, completion)
                    dropped.pop(shape, None)
            pending = still
        if not texts:
            raise DiversifyError(f"no training text passed the guard for rule {rule[:60]!r}: {dropped}")
        return Diversification([texts[s] for s in cfg.shapes if s in texts], dropped)
