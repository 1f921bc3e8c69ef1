"""GGUF files for llama.cpp: each expert of the bank as a LoRA adapter, and small Llama models.

llama.cpp applies a LoRA adapter loaded with scale ``s`` as

    out = W x + s * (alpha / r) * B (A x)

per adapter (``llama-adapter.cpp``; ``r`` is read from the shape of ``lora_a``), so loading
every expert as its own adapter and setting the per-request scales to the mixture weights
``w_n`` gives ``sum_n w_n * B_n A_n x * alpha / r``, the bank's delta exactly.

The file layout follows llama.cpp's ``convert_lora_to_gguf.py``: ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha``, the base model's ``general.architecture``,
and per target weight ``<base tensor>.lora_a`` with numpy shape (r, in) and ``.lora_b`` with
numpy shape (out, r) (the PEFT layout; ggml reverses the axes). For the ``llama``
architecture the converter permutes the rows of q and k for llama.cpp's interleaved rope;
the same permutation applies to the rows of ``lora_b`` (its output axis) and to the model
weights written by :func:`write_llama_gguf`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from adapters.bank import ExpertBank
from agents.errors import AdapterError, AdapterFileError, ModelLoadError
from agents.files import atomic_path

log = logging.getLogger(__name__)

# Architectures whose HF -> GGUF mapping is known here, and whether llama.cpp's converter
# permutes the q/k rows for them (LlamaModel.permute in convert_hf_to_gguf.py).
_PERMUTES_QK = {"llama": True, "qwen2": False}

# Bump when the written layout changes: content names then differ and old files are not reused.
_FORMAT = 1


@dataclass(frozen=True)
class GgufBase:
    """What a LoRA file must agree on with its base GGUF model."""

    arch: str  # general.architecture, e.g. "qwen2" or "llama"
    n_blocks: int  # transformer blocks
    n_head: int  # attention heads
    n_head_kv: int  # key/value heads

    def __post_init__(self) -> None:
        if self.arch not in _PERMUTES_QK:
            raise AdapterError(
                f"llama.cpp LoRA export supports the architectures {sorted(_PERMUTES_QK)}, got {self.arch!r}"
            )
        if min(self.n_blocks, self.n_head, self.n_head_kv) < 1:
            raise AdapterError(f"implausible GGUF base {self}")

    @classmethod
    def read(cls, gguf_path: str | Path) -> GgufBase:
        """The architecture and head counts from a GGUF model's metadata (tensor data is not read)."""
        from gguf import GGUFReader

        path = Path(gguf_path)
        try:
            fields = GGUFReader(path).fields
            arch = fields["general.architecture"].contents()

            def number(key: str) -> int:
                return int(fields[f"{arch}.{key}"].contents())

            n_head = number("attention.head_count")
            n_head_kv = number("attention.head_count_kv") if f"{arch}.attention.head_count_kv" in fields else n_head
            return cls(arch, number("block_count"), n_head, n_head_kv)
        except (OSError, ValueError, KeyError) as err:
            raise AdapterFileError(f"cannot read the GGUF model metadata of {path}: {err}") from err

    @classmethod
    def of_model(cls, config) -> GgufBase:
        """The same facts from a transformers config (for a GGUF written by write_llama_gguf)."""
        return cls(
            config.model_type,
            config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        )

    def tensor_name(self, module_name: str) -> str:
        """The GGUF weight a Hugging Face module name maps to, e.g. ``blk.0.attn_q.weight``."""
        mapped = _name_map(self.arch, self.n_blocks).get_name(module_name)
        if mapped is None:
            raise AdapterError(f"module {module_name!r} has no GGUF tensor in the {self.arch} layout")
        return f"{mapped}.weight"

    def permute_rows(self, module_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows (output axis first) of q or k in llama.cpp's order; other weights unchanged."""
        if not _PERMUTES_QK[self.arch]:
            return rows
        leaf = module_name.rsplit(".", 1)[-1]
        if leaf == "q_proj":
            heads = self.n_head
        elif leaf == "k_proj":
            heads = self.n_head_kv
        else:
            return rows
        # convert_hf_to_gguf.py LlamaModel.permute: (heads, 2, d/2, ...) -> (heads, d/2, 2, ...).
        out = rows.shape[0]
        return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


@functools.lru_cache(maxsize=8)
def _name_map(arch: str, n_blocks: int):
    """gguf's HF -> GGUF tensor name map; building one takes milliseconds, so it is built once."""
    import gguf

    return gguf.get_tensor_name_map(next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), n_blocks)


def expert_is_zero(bank: ExpertBank, expert: int) -> bool:
    """True when every B of the expert is zero: its delta is exactly zero whatever A is."""
    with torch.no_grad():
        return all(not bool(layer.lora_B[expert].any()) for layer in bank.layers.values())


def expert_tensors(bank: ExpertBank, expert: int, base: GgufBase) -> dict[str, np.ndarray]:
    """The GGUF LoRA tensors of one expert: name -> float32 array in numpy (ggml-reversed) shape."""
    if not 0 <= expert < bank.n_experts:
        raise AdapterError(f"expert index {expert} is out of range [0, {bank.n_experts})")
    tensors = {}
    with torch.no_grad():
        for name, layer in bank.layers.items():
            target = base.tensor_name(name)
            a = layer.lora_A[expert].detach().float().cpu()  # (r, in)
            b = base.permute_rows(name, layer.lora_B[expert].detach().float().cpu().T)  # (out, r)
            tensors[f"{target}.lora_a"] = np.ascontiguousarray(a.numpy())
            tensors[f"{target}.lora_b"] = np.ascontiguousarray(b.numpy())
    return tensors


def _digest(tensors: dict[str, np.ndarray], base: GgufBase, alpha: float) -> str:
    digest = hashlib.sha256(json.dumps({"format": _FORMAT, "arch": base.arch, "alpha": alpha}).encode())
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].tobytes())
    return digest.hexdigest()


@contextmanager
def _atomic_gguf(dest: Path, arch: str):
    """A GGUFWriter on a temp file beside ``dest``, renamed over it once written: ``dest`` is whole or absent."""
    import gguf

    with atomic_path(dest) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def write_lora_gguf(tensors: dict[str, np.ndarray], path: Path, base: GgufBase, alpha: float) -> Path:
    """Write LoRA tensors as a llama.cpp adapter file, atomically (temp file, then rename)."""
    import gguf

    with _atomic_gguf(path, base.arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for name, array in tensors.items():
            writer.add_tensor(name, array)
    return path


def export_expert_loras(bank: ExpertBank, out_dir: str | Path, base: GgufBase) -> dict[int, Path]:
    """Write every non-zero expert as ``expert{N}-{sha}.gguf`` in ``out_dir``; return expert -> file.

    Files are named by content, so an unchanged expert is not written again and a file never
    changes under a reader. Experts whose B is all zero add nothing and get no file.
    """
    out = Path(out_dir)
    files = {}
    for expert in range(bank.n_experts):
        if expert_is_zero(bank, expert):
            continue
        tensors = expert_tensors(bank, expert, base)
        path = out / f"expert{expert:02d}-{_digest(tensors, base, bank.config.alpha)[:16]}.gguf"
        if not path.is_file():
            write_lora_gguf(tensors, path, base, bank.config.alpha)
            log.info("wrote expert %d as GGUF LoRA %s", expert, path)
        files[expert] = path
    return files


def write_llama_gguf(model, tokenizer, path: str | Path) -> Path:
    """Write a small Llama (transformers) with its byte-level BPE tokenizer as a float32 GGUF.

    For tests and tiny models: float32 keeps llama.cpp's arithmetic close to torch's. The
    tokenizer is stored for completeness; the llama.cpp backend sends token ids it made
    with the transformers tokenizer and decodes the ids it gets back the same way.
    """
    import gguf

    config = model.config
    if config.model_type != "llama":
        raise ModelLoadError(f"write_llama_gguf writes Llama models only, got model_type {config.model_type!r}")
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if spec.get("type") != "BPE":
        raise ModelLoadError(f"write_llama_gguf needs a BPE tokenizer, got {spec.get('type')!r}")
    base = GgufBase.of_model(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", 10000.0)}

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(base.n_head_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, types = [], []
    for i in range(config.vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        # Ordinary tokens are stored as user-defined: llama.cpp then prints their byte-level
        # text as is, which is always whole UTF-8, so its server never holds a token back
        # mid-character (a random model emits stray bytes all the time). Only llama.cpp's own
        # text output changes; the ids, which the backend uses, do not.
        types.append(gguf.TokenType.CONTROL if i in added else gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    # Single digits, then GPT-2's byte-level split: the tiny tokenizer's pre-tokenizer.
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith((".lora_A", ".lora_B")):
                continue  # an injected expert bank: write the frozen base only
            module = name.removesuffix(".weight").replace(".base_layer", "")
            mapped = names.get_name(module)
            if mapped is None:
                raise ModelLoadError(f"write_llama_gguf: no GGUF tensor for {name!r}")
            data = base.permute_rows(module, tensor.detach().float().cpu())
            writer.add_tensor(f"{mapped}.weight", np.ascontiguousarray(data.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# Encodings for the re-encoded copy: a numpy dtype, or None for Q8_0 (blocks of 32 int8 values
# with one f16 scale: within half a step of 1/127 of each block's largest weight).
_DENSE_TYPES = {"f32": (np.float32, "ALL_F32"), "f16": (np.float16, "MOSTLY_F16"), "q8_0": (None, "MOSTLY_Q8_0")}


def write_dense_gguf(source: str | Path, dest: str | Path, dtype: str = "f32") -> Path:
    """Copy a GGUF model with every tensor dequantized and re-encoded as ``dtype``, metadata unchanged.

    The torch backend runs the dequantized weights in float32; llama.cpp serving the float32
    copy multiplies the same numbers with float32 activations. "f16" rounds each weight to
    11 significant bits; "q8_0" re-quantizes the dequantized weights in blocks of 32 (the
    matrices only; norms and biases stay float32), half the bytes of f16, and llama.cpp then
    rounds activations to 8 bits as well. Written to a temp file and renamed, so ``dest`` is
    whole or absent.
    """
    import gguf

    if dtype not in _DENSE_TYPES:
        raise ModelLoadError(f"dense GGUF dtype must be one of {sorted(_DENSE_TYPES)}, got {dtype!r}")
    np_type, file_type = _DENSE_TYPES[dtype]
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    dest = Path(dest)
    with _atomic_gguf(dest, arch) as writer:
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue  # written by the writer itself, or changed below
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
        for tensor in reader.tensors:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            if data.ndim == 1 or (np_type is None and data.shape[-1] % 32):
                # Norms and biases stay float32, as llama.cpp's converter keeps 1-D tensors.
                writer.add_tensor(tensor.name, data.astype(np.float32))
            elif np_type is None:
                quant = gguf.GGMLQuantizationType.Q8_0
                blocks = gguf.quants.quantize(data.astype(np.float32), quant)
                writer.add_tensor(tensor.name, blocks, raw_shape=blocks.shape, raw_dtype=quant)
            else:
                writer.add_tensor(tensor.name, data.astype(np_type))
    return dest
