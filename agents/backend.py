"""Generation backends: what the solver, reflector, diversifier and harness call to generate text.

A backend turns chat messages into prompts and prompts into completions under an expert
mixture. ``TorchBackend`` is the reference: it runs the transformers model with the bank
in the same process and works for every model spec and for training. ``LlamaCppBackend``
(``agents.backend_llamacpp``) serves the model's GGUF with llama.cpp and applies the same
mixture as LoRA adapters. ``SplitBackend`` sends bare-model calls to llama.cpp and
mixtures to torch: llama.cpp batches only sequences with equal adapter scales (a different
top-2 mixture per row ran at a quarter of the torch bank's speed), and two active LoRAs took
a third of its speed, while the torch bank mixes per row in one batch at about 10% cost
(measured, bench/bench_generation.py). ``make_backend`` picks one by name; "auto" is the split one when llama.cpp can serve
the model, else torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

import torch

from adapters.bank import ExpertBank
from agents.errors import SelfImproveError
from agents.generation import Generation, chat_prompt, generate

if TYPE_CHECKING:
    from agents.backend_llamacpp import LlamaCppConfig
    from agents.models import LoadedModel

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "llama.cpp")


class BackendError(SelfImproveError):
    """A generation backend cannot be built or used as asked (missing package or GGUF, bad request)."""


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


@runtime_checkable
class GenerationBackend(Protocol):
    name: str
    description: str  # one line for run logs and reports: what generates, and how

    def chat_prompt(self, system: str | None, user: str) -> str:
        """The model's chat-templated prompt for one user turn (and an optional system turn)."""

    def generate(
        self,
        prompts: Sequence[str],
        *,
        weights: torch.Tensor | None = None,
        max_new_tokens: int = 384,
        stop_at_answer: bool = False,
        sampling: Sampling = GREEDY,
    ) -> list[Generation]:
        """Completions of templated prompts; ``weights`` (batch or 1, n_experts), None = bare model."""


class TorchBackend:
    """The reference backend: transformers generate with the expert bank in this process."""

    name = "torch"

    def __init__(self, model, tokenizer, bank: ExpertBank | None, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.bank, self.batch_size = model, tokenizer, bank, batch_size

    @property
    def description(self) -> str:
        weight = next(self.model.parameters())
        return (f"torch {torch.__version__} (transformers generate), {weight.dtype} weights on {weight.device}, "
                f"batches of {self.batch_size}, {torch.get_num_threads()} threads")

    def chat_prompt(self, system: str | None, user: str) -> str:
        return chat_prompt(self.tokenizer, system, user)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        weights: torch.Tensor | None = None,
        max_new_tokens: int = 384,
        stop_at_answer: bool = False,
        sampling: Sampling = GREEDY,
    ) -> list[Generation]:
        results: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = list(prompts[start : start + self.batch_size])
            chunk_weights = None
            if weights is not None:
                chunk_weights = weights if weights.shape[0] == 1 else weights[start : start + len(chunk)]
            # Sampling seeds the RNG per chunk, inside a fork, so runs repeat and nothing else is disturbed.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sampling.seed + start)
                results += generate(
                    self.model,
                    self.tokenizer,
                    self.bank,
                    chunk,
                    chunk_weights,
                    max_new_tokens=max_new_tokens,
                    stop_at_answer=stop_at_answer,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                )
        return results


class SplitBackend:
    """Bare-model generations on a fast backend, expert mixtures on the reference one.

    A call without weights (or with all-zero weights, which apply no expert) goes to
    ``fast``; any other mixture goes to ``reference``, which holds the bank. With llama.cpp on
    its default f16 copy as ``fast``, bare calls reached torch's final answer on 16 of 16
    problems measured: the split changes speed, and results only within that tolerance.
    """

    name = "auto"

    def __init__(self, fast: GenerationBackend, reference: GenerationBackend):
        self.fast, self.reference = fast, reference

    @property
    def description(self) -> str:
        return f"bare model: {self.fast.description}; expert mixtures: {self.reference.description}"

    def chat_prompt(self, system: str | None, user: str) -> str:
        return self.reference.chat_prompt(system, user)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        weights: torch.Tensor | None = None,
        max_new_tokens: int = 384,
        stop_at_answer: bool = False,
        sampling: Sampling = GREEDY,
    ) -> list[Generation]:
        bare = weights is None or not bool(weights.detach().ne(0).any())
        backend = self.fast if bare else self.reference
        return backend.generate(prompts, weights=None if bare else weights, max_new_tokens=max_new_tokens,
                                stop_at_answer=stop_at_answer, sampling=sampling)

    def close(self) -> None:
        close_backend(self.fast)
        close_backend(self.reference)


def close_backend(backend: GenerationBackend) -> None:
    """Free what a backend holds outside Python's reach (llama.cpp's model and KV cache); torch holds nothing."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def make_backend(
    name: str,
    loaded: LoadedModel,
    bank: ExpertBank | None,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 384,
    llamacpp: LlamaCppConfig | None = None,
) -> GenerationBackend:
    """The backend called `name` ("torch", "llama.cpp" or "auto") for a loaded model and its bank.

    ``max_new_tokens`` is the solver's answer cap, which sizes llama.cpp's context per sequence.

    "llama.cpp" serves every call there, mixtures as LoRA scales. "auto" is a SplitBackend
    (bare calls on llama.cpp, mixtures on torch) when llama.cpp can serve this model exactly
    as loaded: xllamacpp is installed, the model came from a GGUF file (``loaded.gguf_path``)
    and runs on the CPU (on CUDA the torch backend is the fast one). Otherwise it takes
    torch, and says why. An explicit "llama.cpp" that cannot be served is an error, never a
    silent fallback.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "torch":
        return TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=batch_size)
    from agents.backend_llamacpp import LlamaCppBackend, LlamaCppConfig, xllamacpp_available

    missing = None
    if not xllamacpp_available():
        missing = "xllamacpp is not installed (pip install xllamacpp)"
    elif loaded.gguf_path is None or not loaded.gguf_path.is_file():
        missing = f"model {loaded.spec!r} has no GGUF file"
    elif loaded.device.type != "cpu":
        missing = f"the model runs on {loaded.device}, where the torch backend is the fast one"
    if missing is not None:
        if name == "llama.cpp":
            raise BackendError(f"cannot use the llama.cpp backend: {missing}")
        log.info("backend auto: torch, because %s", missing)
        return TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=batch_size)
    # A reflect prompt holds a whole answer (up to the solver's max_new_tokens) plus the
    # question, the reference solution and a rule; llama.cpp needs room for it in every slot.
    config = llamacpp or LlamaCppConfig(parallel=batch_size, ctx_per_sequence=2 * max_new_tokens + 1024)
    if name == "auto":
        fast = LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, None, config)
        return SplitBackend(fast, TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=batch_size))
    return LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, bank, config)
