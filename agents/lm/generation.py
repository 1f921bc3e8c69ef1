"""Batched generation through the expert bank, stopping once the answer line is complete."""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from typing import Callable, Generic, Sequence, TypeVar

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from adapters.bank import ExpertBank

T = TypeVar("T")

# An answer line is complete when the number after "answer is" (or inside \boxed{}) is
# followed by a line end or a sentence end; "18." alone might still become "18.5", so a
# final period waits for the next token (or the end-of-sequence token ends it anyway).
ANSWER_COMPLETE = re.compile(
    r"(?:answer\s+is|####)[^\n]*?\d[^\n]*?(?:\n|\.\s|\\\)|\$\s)|\\boxed\{[^{}]*\d[^{}]*\}",
    re.IGNORECASE,
)
ANSWER_WINDOW = 48  # generated tokens decoded per answer-line check: enough to hold one answer line


def answer_complete(tokenizer, generated: Sequence[int]) -> bool:
    """Whether the tail of the generated token ids holds a complete answer line (the stop every backend uses)."""
    tail = list(generated[-ANSWER_WINDOW:])
    return bool(ANSWER_COMPLETE.search(tokenizer.decode(tail, skip_special_tokens=True)))


def finished(tokenizer, generated: Sequence[int], strip: set[int], seconds: float) -> Generation:
    """A finished sequence as a Generation: trailing stop and padding ids in ``strip`` dropped, the rest decoded."""
    ids = list(generated)
    while ids and ids[-1] in strip:
        ids.pop()
    return Generation(tokenizer.decode(ids, skip_special_tokens=True), len(ids), seconds)


@dataclass
class Generation:
    text: str  # the generated text, prompt excluded
    new_tokens: int  # tokens generated, up to and including the stop
    seconds: float  # wall time of the call (batch) that generated it


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; the default is greedy decoding."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0  # sampled runs with the same seed give the same texts

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


@dataclass(frozen=True)
class Request:
    """Prompts decoded alike: one agent's call, which a backend may serve together with others."""

    prompts: tuple[str, ...]
    weights: torch.Tensor | None = None  # (len(prompts) or 1, n_experts); None: the bare model
    max_new_tokens: int = 384
    stop_at_answer: bool = False
    sampling: Sampling = GREEDY

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if self.weights is not None and self.weights.shape[0] not in (1, len(self.prompts)):
            raise ValueError(f"got mixture weights for {self.weights.shape[0]} rows and {len(self.prompts)} prompts")


@dataclass(frozen=True)
class Ask(Generic[T]):
    """An agent's request and how it reads the completions: what it hands to a call shared with others."""

    request: Request
    read: Callable[[list[Generation]], T]


class AnswerLineComplete(StoppingCriteria):
    """Per-sequence stop once the generated text holds a complete answer line."""

    def __init__(self, tokenizer, prompt_width: int):
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        generated = input_ids[:, self.prompt_width :].tolist()  # (batch, new tokens)
        return torch.tensor([answer_complete(self.tokenizer, row) for row in generated], device=input_ids.device)


def mixture_applied(bank: ExpertBank | None, weights: torch.Tensor | None):
    """The context a forward pass runs in: the expert mixture ``weights``, the bare model (None), or no bank."""
    if bank is None:
        return contextlib.nullcontext()
    return bank.bypass() if weights is None else bank.route(weights)


def chat_prompt(tokenizer, system: str | None, user: str) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    bank: ExpertBank | None,
    prompts: list[str],
    weights: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 384,
    stop_at_answer: bool = True,
    sampling: Sampling = GREEDY,
) -> list[Generation]:
    """Completions of already-templated prompts (greedy unless sampling.temperature > 0), batched with left padding.

    ``weights`` (batch or 1, n_experts) is the expert mixture; None runs the bare model. Sampled
    rows draw from torch's global generator: the caller seeds it (``TorchBackend`` does, from
    ``sampling.seed``).
    """
    if tokenizer.padding_side != "left":
        raise ValueError("generation needs a left-padding tokenizer")
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    width = enc["input_ids"].shape[1]
    criteria = StoppingCriteriaList([AnswerLineComplete(tokenizer, width)]) if stop_at_answer else None
    start = time.perf_counter()
    kwargs = dict(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=sampling.temperature > 0,
        **({"temperature": sampling.temperature, "top_p": sampling.top_p} if sampling.temperature > 0 else {}),
        stopping_criteria=criteria,
        pad_token_id=tokenizer.pad_token_id,
    )
    with mixture_applied(bank, None if weights is None else weights.to(device)):
        out = model.generate(**kwargs)
    seconds = time.perf_counter() - start
    strip = {tokenizer.pad_token_id, tokenizer.eos_token_id}
    return [finished(tokenizer, row, strip, seconds) for row in out[:, width:].tolist()]
