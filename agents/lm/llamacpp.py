"""The llama.cpp generation backend: the model's GGUF served by llama.cpp, experts as LoRA adapters.

llama.cpp runs in this process through xllamacpp (prebuilt CPU wheels on PyPI; the
alternative, llama-cpp-python, ships only a source archive there and compiles llama.cpp
for many minutes on install). xllamacpp embeds llama.cpp's server: one model, several
slots decoded together in one batch (continuous batching), a per-slot prompt cache, and
per-request LoRA scales.

Weights. By default llama.cpp serves a float16 copy of the GGUF with every tensor
dequantized (``LlamaCppConfig.weights``): the values the torch backend runs in float32, with
float activations; it reached torch's final answer on every bare-model problem measured.
Kernels for 8-bit and 4-bit weights (a Q8_0 copy, or the shipped Q4_K_M) are faster but
round activations to 8 bits, which changed the final answer on about half of the problems.

Mixture semantics. Every expert whose B is not all zero is written as a GGUF LoRA file
(``adapters.gguf_lora``) and loaded once; a request sets adapter ``n``'s scale to the
mixture weight ``w_n``, and llama.cpp adds ``w_n * alpha/r * B_n A_n x`` per adapter, the
bank's delta exactly. Experts with zero weight or zero B are skipped, as in the bank. The
bank changes in place during training; each parameter's in-place version counter tells
when, and the next ``generate`` rewrites the changed experts and restarts the server
(seconds: bench/bench_generation.py), since llama.cpp loads adapters only at start.

Token ids. Prompts are tokenized with the transformers tokenizer, sent as ids, and the
returned ids are decoded with the same tokenizer, so a prompt and a completion mean the
same ids as in the torch backend (``agents.lm.llamacpp_tokens`` reads the streamed frames).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from adapters.bank import ExpertBank
from adapters.gguf_lora import GgufBase, export_expert_loras, write_dense_gguf
from agents.files import cache_root, file_fingerprint
from agents.lm.backend import BackendError
from agents.lm.generation import GREEDY, Generation, Request, Sampling, chat_prompt, finished
from agents.lm.llamacpp_tokens import TokenStream, byte_tables
from agents.lm.precision import device_name

log = logging.getLogger(__name__)

# The server holds back a token that ends mid-character until the character is complete: at
# most 3 more tokens (4 bytes). Asking for that many extra tokens flushes the ids of the last
# allowed ones; the stream is cut at max_new_tokens.
_FLUSH_SLACK = 3
_KV_TYPES = ("f16", "f32")
_FLASH = ("auto", "on", "off")
_WEIGHTS = ("f16", "f32", "q8_0", "gguf")


@dataclass
class LlamaCppConfig:
    # Which weights llama.cpp multiplies, all made from the GGUF once and cached. "f16" (the
    # default) / "f32": every tensor dequantized, the numbers torch runs, with float
    # activations. "q8_0": the dequantized weights re-quantized in blocks of 32; "gguf": the
    # file as shipped (Q4_K_M for the default model). Their kernels round activations to 8
    # bits: faster, but they change final answers (bench/bench_generation.py; the README has
    # the figures). A GGUF without quantized tensors is served as is.
    weights: str = "f16"
    threads: int | None = None  # llama.cpp threads; None: torch.get_num_threads(), the count the run set
    parallel: int = 8  # sequences decoded together (server slots); more requests wait for a slot
    ctx_per_sequence: int = 1024  # KV cache positions per slot: prompt + max_new_tokens must fit
    cache_prompt: bool = True  # reuse a slot's KV cache for the prefix its next prompt shares
    kv_cache: str = "f16"  # KV cache type: "f16" (llama.cpp's default) or "f32" (closest to torch float32)
    # llama.cpp's flash attention on CPU computes in f16 (logit errors ~1e-3 relative, measured on
    # the tiny model; ~1e-6 with "off" and an f32 cache): "auto" (llama.cpp decides), "on" or "off".
    flash_attention: str = "auto"
    adapter_dir: str | None = None  # where expert LoRA files go; None: a temp dir removed at close()
    verbosity: int = -1  # llama.cpp's log threshold: -1 silent, 3 everything (to stderr)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if self.ctx_per_sequence < 16:
            raise ValueError(f"ctx_per_sequence must be >= 16, got {self.ctx_per_sequence}")
        if self.weights not in _WEIGHTS:
            raise ValueError(f"weights must be one of {_WEIGHTS}, got {self.weights!r}")
        if self.kv_cache not in _KV_TYPES:
            raise ValueError(f"kv_cache must be one of {_KV_TYPES}, got {self.kv_cache!r}")
        if self.flash_attention not in _FLASH:
            raise ValueError(f"flash_attention must be one of {_FLASH}, got {self.flash_attention!r}")


def xllamacpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("xllamacpp") is not None


class LlamaCppBackend:
    """GenerationBackend on llama.cpp: the GGUF base model, with the bank's experts as LoRA adapters."""

    name = "llama.cpp"

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer,
        bank: ExpertBank | None = None,
        config: LlamaCppConfig | None = None,
    ):
        if not xllamacpp_available():
            raise BackendError("the llama.cpp backend needs xllamacpp: pip install xllamacpp")
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise BackendError(f"the llama.cpp backend needs a GGUF model file; {self.gguf_path} does not exist")
        self.tokenizer, self.bank = tokenizer, bank
        self.config = config or LlamaCppConfig()
        self.model_path = self._served_weights()  # what llama.cpp loads: the GGUF or its dense copy
        self.base = GgufBase.read(self.gguf_path) if bank is not None else None
        if self.config.adapter_dir is None:
            self._adapter_dir = Path(tempfile.mkdtemp(prefix="selfimprove-lora-"))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._adapter_dir, True)
        else:
            self._adapter_dir = Path(self.config.adapter_dir)
            self._cleanup = None
        self._server = None
        self._adapters: dict[int, int] = {}  # expert -> llama.cpp adapter index
        self._files: dict[int, Path] = {}  # expert -> its GGUF LoRA file, as loaded
        self._bank_state: tuple | None = None  # the bank's parameter versions when the files were written
        self._slot_lora: dict[int, tuple] = {}  # slot -> adapter scales its KV cache was computed with
        self._lock = threading.Lock()  # one generate at a time: a restart must not cut a running request
        self._closed = False
        self._token_bytes, self._bytes_token = byte_tables(tokenizer)
        self._stop_ids = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}

    # --- the GenerationBackend protocol ---------------------------------------------------

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
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompts:
            return []
        if weights is not None and weights.dim() == 1:
            weights = weights.unsqueeze(0)  # (n_experts,) -> (1, n_experts), as Request expects
        self._scale_rows(weights, len(prompts))  # checked before Request's own check, with this backend's message
        return self.generate_requests([Request(tuple(prompts), weights, max_new_tokens, stop_at_answer, sampling)])[0]

    def generate_requests(self, requests: Sequence[Request]) -> list[list[Generation]]:
        """Several agents' calls as one: their rows share the server's slots, so they decode together.

        Each row is sent as it would be in a call of its own (its request's LoRA scales, token
        cap, answer stop, and the seed of its place in its request), so only the slots differ.
        """
        rows = []  # (request, index in it, prompt ids, LoRA scales)
        for r, request in enumerate(requests):
            if request.max_new_tokens < 1:
                raise ValueError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
            scales = self._scale_rows(request.weights, len(request.prompts))
            for i, prompt in enumerate(request.prompts):
                ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
                if len(ids) + request.max_new_tokens + _FLUSH_SLACK > self.config.ctx_per_sequence:
                    raise BackendError(
                        f"a prompt of {len(ids)} tokens plus max_new_tokens={request.max_new_tokens} (+{_FLUSH_SLACK}) "
                        f"exceeds ctx_per_sequence={self.config.ctx_per_sequence}; raise LlamaCppConfig.ctx_per_sequence")
                rows.append((r, i, ids, scales[0 if len(scales) == 1 else i]))
        if not rows:
            return [[] for _ in requests]
        with self._lock:
            self._sync()
            slots = min(self.config.parallel, len(rows))

            def run_slot(slot: int) -> list[tuple[int, list[int]]]:
                # Slot `slot` takes rows slot, slot + slots, ...: one request at a time per slot, so
                # the slot's KV cache holds exactly the previous request of this thread, and the
                # same calls meet the same slots on every run.
                done = []
                for n in range(slot, len(rows), slots):
                    r, i, ids, scales = rows[n]
                    request = requests[r]
                    sent = self._request(i, slot, ids, scales, request.max_new_tokens, request.sampling)
                    done.append((n, self._complete(sent, request.max_new_tokens, request.stop_at_answer)))
                return done

            start = time.perf_counter()
            with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="llamacpp") as pool:
                by_row = dict(pair for chunk in pool.map(run_slot, range(slots)) for pair in chunk)
            seconds = time.perf_counter() - start
        outputs: list[list[Generation]] = [[] for _ in requests]
        for n, (r, _i, _ids, _scales) in enumerate(rows):
            outputs[r].append(finished(self.tokenizer, by_row[n], self._stop_ids, seconds))
        return outputs

    # --- lifecycle ---------------------------------------------------------------------------

    def refresh(self) -> None:
        """Rewrite the adapters from the bank now (generate does this by itself when the bank changed)."""
        with self._lock:
            self._bank_state = None
            self._sync()

    def close(self) -> None:
        """Stop llama.cpp and remove the temporary adapter files; the backend cannot be used afterwards."""
        with self._lock:
            self._closed = True
            self._server = None  # the server's destructor ends its loop thread
            if self._cleanup is not None:
                self._cleanup()

    def __enter__(self) -> LlamaCppBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def description(self) -> str:
        """One line for run logs and reports: what serves the generations, and how."""
        from importlib.metadata import version

        cfg = self.config
        served = f"{cfg.weights} copy of {self.gguf_path.name}" if self.model_path != self.gguf_path else self.gguf_path.name
        return (
            f"llama.cpp (xllamacpp {version('xllamacpp')}) serving {served}, "
            f"{cfg.parallel} slots, {cfg.threads or torch.get_num_threads()} threads, KV {cfg.kv_cache}, on {device_name('cpu')}"
        )

    @property
    def loaded_experts(self) -> list[int]:
        """Experts loaded as LoRA adapters (the others have B = 0 and add nothing)."""
        with self._lock:
            self._sync()
            return sorted(self._adapters)

    # --- internals ---------------------------------------------------------------------------

    def _bank_versions(self) -> tuple | None:
        if self.bank is None:
            return None
        # Every in-place change (optimizer step, copy_ on load or rollback) bumps a tensor's
        # version counter; a replaced parameter changes identity.
        return tuple((id(p), p._version) for p in self.bank.adapter_parameters())

    def _sync(self) -> None:
        """Make the loaded adapters match the bank, restarting llama.cpp when they change."""
        if self._closed:
            raise BackendError("this llama.cpp backend was closed")
        state = self._bank_versions()
        if self._server is not None and state == self._bank_state:
            return
        files = export_expert_loras(self.bank, self._adapter_dir, self.base) if self.bank is not None else {}
        if self._server is None or files != self._files:
            self._server = None  # free the old model and KV cache before the new server allocates
            self._server = self._start(files)
            self._files = files
            self._adapters = {expert: index for index, expert in enumerate(sorted(files))}
            self._slot_lora = {}
            self._prune(set(files.values()))
        self._bank_state = state

    def _start(self, files: dict[int, Path]):
        import xllamacpp

        bounded_wait = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE" or "GOMP_SPINCOUNT" in os.environ
        if not bounded_wait:
            _warn_wait_policy()

        cfg = self.config
        threads = cfg.threads or torch.get_num_threads()
        params = xllamacpp.CommonParams()
        params.model.path = str(self.model_path)
        params.n_parallel = cfg.parallel
        params.n_ctx = cfg.parallel * cfg.ctx_per_sequence
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.n_gpu_layers = 0
        kv_type = xllamacpp.ggml_type.GGML_TYPE_F32 if cfg.kv_cache == "f32" else xllamacpp.ggml_type.GGML_TYPE_F16
        params.cache_type_k = kv_type
        params.cache_type_v = kv_type
        flash = xllamacpp.llama_flash_attn_type
        params.flash_attn_type = {
            "auto": flash.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": flash.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": flash.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[cfg.flash_attention]
        params.port = 0  # the embedded server's HTTP listener binds a free loopback port; we call it in-process
        params.verbosity = cfg.verbosity
        params.warmup = False
        params.lora_init_without_apply = True  # every adapter starts at scale 0; requests set the mixture
        # llama.cpp reuses a slot's cached prompt, and restores saved prompt states, even when the
        # request's LoRA scales differ from those the cache was computed with (measured: wrong
        # tokens). So the host-memory prompt cache is off and _request reuses a slot's cache only
        # under the same scales.
        params.cache_ram_mib = 0
        params.cache_idle_slots = False
        params.lora_adapters = [xllamacpp.CommonAdapterLoraInfo(str(files[e]), 0.0) for e in sorted(files)]
        started = time.perf_counter()
        try:
            server = xllamacpp.Server(params)
        except RuntimeError as err:
            raise BackendError(
                f"llama.cpp could not load {self.model_path} with {len(files)} LoRA adapters ({err}); "
                "set LlamaCppConfig.verbosity=3 to see its log"
            ) from err
        log.info(
            "llama.cpp serving %s with %d adapters, %d slots x %d positions, %d threads (%.1f s)",
            self.model_path.name, len(files), cfg.parallel, cfg.ctx_per_sequence, threads,
            time.perf_counter() - started,
        )
        return server

    def _served_weights(self) -> Path:
        """The GGUF as shipped, or its dense copy in the cache (written once, then reused)."""
        from gguf import GGMLQuantizationType, GGUFReader

        if self.config.weights == "gguf":
            return self.gguf_path
        dense = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}
        if all(t.tensor_type in dense for t in GGUFReader(self.gguf_path).tensors):
            return self.gguf_path
        key = file_fingerprint(self.gguf_path)
        path = cache_root() / "gguf-dense" / f"{self.gguf_path.stem}-{key}-{self.config.weights}.gguf"
        if not path.is_file():
            started = time.perf_counter()
            log.info("writing a %s copy of %s to %s (once)", self.config.weights, self.gguf_path.name, path)
            write_dense_gguf(self.gguf_path, path, self.config.weights)
            log.info("wrote %s in %.0f s", path.name, time.perf_counter() - started)
        return path

    def _prune(self, keep: set[Path]) -> None:
        """Delete expert files of earlier bank states (content-named, so none is in use now)."""
        for old in self._adapter_dir.glob("expert*-*.gguf"):
            if old not in keep:
                old.unlink(missing_ok=True)

    def _scale_rows(self, weights: torch.Tensor | None, batch: int) -> list[list[float] | None]:
        if weights is None:
            return [None]
        if self.bank is None:
            raise BackendError("mixture weights were given but this backend has no expert bank")
        if weights.dim() != 2 or weights.shape[1] != self.bank.n_experts or weights.shape[0] not in (1, batch):
            raise BackendError(
                f"mixture weights must have shape (1 or {batch}, {self.bank.n_experts}), got {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all():
            raise BackendError("mixture weights contain NaN or inf")
        return weights.detach().float().cpu().tolist()

    def _request(self, index: int, slot: int, ids: list[int], scales: list[float] | None, max_new_tokens: int,
                 sampling: Sampling) -> dict:
        lora = [{"id": adapter, "scale": 0.0 if scales is None else float(scales[expert])}
                for expert, adapter in self._adapters.items()]
        key = tuple(item["scale"] for item in lora)
        reuse = self.config.cache_prompt and self._slot_lora.get(slot) == key
        self._slot_lora[slot] = key
        request = {
            "prompt": ids,
            "id_slot": slot,
            "max_tokens": max_new_tokens + _FLUSH_SLACK,
            "stream": True,
            "logprobs": 1,  # each frame then carries its token id
            "timings_per_token": True,  # and the running token count, which reveals held-back tokens
            "cache_prompt": reuse,
            "lora": lora,
            # Only the samplers transformers' generate uses: temperature and top-p.
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "typical_p": 1.0,
            "repeat_penalty": 1.0,
            "seed": sampling.seed + index,  # per prompt, so sampled runs repeat
        }
        return request

    def _complete(self, request: dict, max_new_tokens: int, stop_at_answer: bool) -> list[int]:
        stream = TokenStream(self, max_new_tokens, stop_at_answer)
        self._server.handle_completions(request, stream.on_frame)
        if stream.error is not None:
            raise BackendError(f"llama.cpp failed a completion: {stream.error}")
        return stream.ids


@functools.lru_cache(maxsize=1)  # once per process
def _warn_wait_policy() -> None:
    # llama.cpp's threads meet at an OpenMP barrier after every op. xllamacpp uses the
    # libgomp that torch loaded (same soname), which read its wait settings when torch was
    # imported; its default spin-wait collapses when other processes share the cores
    # (bench/bench_generation.py measures it; figures in the README).
    log.warning(
        "OpenMP threads spin-wait long (libgomp's default): on a machine shared with other jobs llama.cpp "
        "can run several times slower; set GOMP_SPINCOUNT=10000 before torch is imported (run_loop.py does)"
    )
