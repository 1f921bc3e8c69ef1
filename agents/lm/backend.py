"""Generation backends: what the solver, reflector, diversifier and evaluation call to generate text.

A backend turns chat messages into prompts and prompts into completions under an expert
mixture. ``TorchBackend`` is the reference: it runs the transformers model with the bank
in the same process and works for every model spec and for training; by default it decodes
with continuous batching (``agents.lm.continuous_batching``). ``LlamaCppBackend``
(``agents.lm.llamacpp``) serves the model's GGUF with llama.cpp and applies the same
mixture as LoRA adapters. ``make_backend`` picks one by name; "auto" is torch, which
bench/bench_generation.py measured faster than llama.cpp and token-identical to plain
transformers generate, while llama.cpp's 8-bit kernels change final answers (figures in the
README).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator, Protocol, Sequence, runtime_checkable

import torch

from adapters.bank import ExpertBank
from agents.errors import SelfImproveError
from agents.lm.continuous_batching import ContinuousBatcher
from agents.lm.generation import GREEDY, Ask, Generation, Request, Sampling, chat_prompt, generate
from agents.lm.precision import check_precision_for_backend, device_name

if TYPE_CHECKING:
    from agents.lm.llamacpp import LlamaCppConfig
    from agents.lm.models import LoadedModel

BACKENDS = ("auto", "torch", "llama.cpp")  # "auto" is torch (see above)
# Sequences generated together: torch's continuous-batching slots, llama.cpp's server slots.
# Wider decode steps keep the CPU's matrix kernels busy (bench/bench_generation.py compares
# slot counts). The key/value cache grows with them: Qwen 0.5B keeps 24 KB per token in
# float32, so 64 slots of 1,100 tokens (a long reflect prompt and its answer) hold 1.7 GB.
DEFAULT_BATCH_SIZE = 64


class BackendError(SelfImproveError):
    """A generation backend cannot be built or used as asked (missing package or GGUF, bad request)."""




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
    """The reference backend: the transformers model with the expert bank in this process.

    ``engine`` "continuous" (the default) decodes through ``agents.lm.continuous_batching``:
    ``batch_size`` slots refilled as answers finish, float32 throughout, the same greedy
    tokens as transformers ``generate`` on every problem measured (bench/bench_generation.py).
    "generate" is plain transformers ``generate`` in batches of ``batch_size``: the reference
    the benchmark and the equivalence tests compare with.
    """

    name = "torch"
    ENGINES = ("continuous", "generate")

    def __init__(self, model, tokenizer, bank: ExpertBank | None, batch_size: int = DEFAULT_BATCH_SIZE,
                 engine: str = "continuous", int8: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if engine not in self.ENGINES:
            raise ValueError(f"engine must be one of {', '.join(self.ENGINES)}, got {engine!r}")
        if int8 and engine != "continuous":
            raise ValueError(f"int8 decoding runs in the continuous engine only, not engine={engine!r}")
        self.model, self.tokenizer, self.bank, self.batch_size, self.engine = model, tokenizer, bank, batch_size, engine
        self.int8 = int8
        self._batcher: ContinuousBatcher | None = None

    @property
    def batcher(self) -> ContinuousBatcher:
        if self._batcher is None:
            self._batcher = ContinuousBatcher(self.model, self.tokenizer, self.bank, slots=self.batch_size,
                                              int8=self.int8)
        return self._batcher

    @property
    def description(self) -> str:
        weight = next(self.model.parameters())
        if self.engine == "continuous":
            how = f"continuous batching, {self.batch_size} slots, {self.batcher.features}"
        else:
            how = f"transformers generate, batches of {self.batch_size}"
        return f"torch {torch.__version__} ({how}), {weight.dtype} weights on {device_name(weight.device)}, {torch.get_num_threads()} threads"

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
        if weights is not None and weights.shape[0] not in (1, len(prompts)):
            raise BackendError(f"got mixture weights for {weights.shape[0]} rows and {len(prompts)} prompts")
        if self.engine == "continuous":
            return self.batcher.generate(
                prompts, weights, max_new_tokens=max_new_tokens, stop_at_answer=stop_at_answer, sampling=sampling,
            )
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
                    sampling=sampling,
                )
        return results

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Generation]]:
        """Several agents' calls as one: continuous batching decodes all their rows together."""
        if self.engine == "continuous":
            return self.batcher.generate_requests(requests)
        return _one_call_each(self, requests)

    def close(self) -> None:
        """Drop the batcher and its key/value cache (made again if the backend is used after)."""
        self._batcher = None

    def __enter__(self) -> TorchBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def generate_together(backend: GenerationBackend, requests: Sequence[Request]) -> list[list[Generation]]:
    """The completions of each request; one call when the backend can serve them together, else one call each."""
    together = getattr(backend, "generate_requests", None)
    return together(list(requests)) if together is not None else _one_call_each(backend, requests)


def ask_together(backend: GenerationBackend, asks: Sequence[Ask]) -> list:
    """Each agent's reading of its completions, the requests generated together (``generate_together``)."""
    outputs = generate_together(backend, [a.request for a in asks])
    return [a.read(out) for a, out in zip(asks, outputs)]


def _one_call_each(backend: GenerationBackend, requests: Sequence[Request]) -> list[list[Generation]]:
    return [backend.generate(r.prompts, weights=r.weights, max_new_tokens=r.max_new_tokens,
                             stop_at_answer=r.stop_at_answer, sampling=r.sampling) for r in requests]


def close_backend(backend: GenerationBackend) -> None:
    """Free what a backend holds (llama.cpp's model, a key/value cache); a backend without ``close`` holds nothing."""
    close = getattr(backend, "close", None)
    if close is not None:
        close()


@contextlib.contextmanager
def opened(backend: GenerationBackend) -> Iterator[GenerationBackend]:
    """``with opened(backend):`` closes any backend when the block ends (the built-in ones are context managers too)."""
    try:
        yield backend
    finally:
        close_backend(backend)


def make_backend(
    name: str,
    loaded: LoadedModel,
    bank: ExpertBank | None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = 384,
    llamacpp: LlamaCppConfig | None = None,
) -> GenerationBackend:
    """The backend called `name` ("torch", "llama.cpp" or "auto", which is torch) for a loaded model and its bank.

    Use it as ``with make_backend(...) as backend:``, which frees what it holds when the block ends.

    ``max_new_tokens`` is the solver's answer cap, which sizes llama.cpp's context per sequence.
    "llama.cpp" serves every call there, mixtures as LoRA scales; when it cannot serve this
    model as loaded (xllamacpp missing, no GGUF file, a CUDA model) that is an error, never
    a silent fallback.
    """
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name in ("torch", "auto"):
        return TorchBackend(loaded.model, loaded.tokenizer, bank, batch_size=batch_size, int8=loaded.int8)
    try:
        check_precision_for_backend(loaded.precision, name)
    except ValueError as err:
        raise BackendError(str(err)) from None
    from agents.lm.llamacpp import LlamaCppBackend, LlamaCppConfig, xllamacpp_available

    if not xllamacpp_available():
        raise BackendError("cannot use the llama.cpp backend: xllamacpp is not installed (pip install xllamacpp)")
    if loaded.gguf_path is None or not loaded.gguf_path.is_file():
        raise BackendError(f"cannot use the llama.cpp backend: model {loaded.spec!r} has no GGUF file")
    if loaded.device.type != "cpu":
        raise BackendError(f"cannot use the llama.cpp backend: the model runs on {loaded.device}, not the CPU")
    # A reflect prompt holds a whole answer (up to the solver's max_new_tokens) plus the
    # question, the reference solution and a rule; llama.cpp needs room for it in every slot.
    config = llamacpp or LlamaCppConfig(parallel=batch_size, ctx_per_sequence=2 * max_new_tokens + 1024)
    return LlamaCppBackend(loaded.gguf_path, loaded.tokenizer, bank, config)
