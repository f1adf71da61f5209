"""The metadata a llama.cpp `llama` GGUF carries: hyper-parameters, provenance, qkiln's own keys.

Kept apart from the byte writer so `inspect` and tests can reason about keys without packing tensors.
Every entry is (key, value, GGUF value type); the order is fixed so files are byte-identical.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

import qkiln
from qkiln.model.config import LlamaConfig

ARCH = "llama"

# GGUF value types for keys whose type llama.cpp checks strictly (it refuses e.g. an INT32 head count).
_U32_KEYS = {
    "general.file_type",
    "general.quantization_version",
    f"{ARCH}.context_length",
    f"{ARCH}.embedding_length",
    f"{ARCH}.feed_forward_length",
    f"{ARCH}.block_count",
    f"{ARCH}.attention.head_count",
    f"{ARCH}.attention.head_count_kv",
    f"{ARCH}.attention.key_length",
    f"{ARCH}.attention.value_length",
    f"{ARCH}.rope.dimension_count",
    f"{ARCH}.rope.scaling.original_context_length",
    f"{ARCH}.vocab_size",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
}

KV = tuple[str, Any, GGUFValueType]


def typed(key: str, value: Any) -> KV:
    """(key, value, type): UINT32 for llama.cpp's counts and ids, FLOAT32 for floats, else by Python type."""
    if key in _U32_KEYS:
        return key, int(value), GGUFValueType.UINT32
    if isinstance(value, bool):
        return key, value, GGUFValueType.BOOL
    if isinstance(value, float):
        return key, value, GGUFValueType.FLOAT32
    if isinstance(value, int):
        return key, value, GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, str):
        return key, value, GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return key, list(value), GGUFValueType.ARRAY
    raise TypeError(f"metadata {key}: unsupported value type {type(value).__name__}")


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where an artifact came from and how it was made (the `general.*` and `qkiln.*` keys)."""

    name: str
    scheme: str
    algorithm: str
    calibration_sha256: str | None = None
    source: str | None = None  # the checkpoint folder's name (never an absolute path: bytes must not depend on it)
    fallbacks: tuple[str, ...] = ()  # "tensor: wanted -> used" lines
    tokenizer_scores: str | None = None  # where a `llama` vocabulary's scores came from (tokenizer.model or merges)

    def general_items(self) -> list[tuple[str, Any]]:
        kv: list[tuple[str, Any]] = [
            ("general.type", "model"),
            ("general.name", self.name),
            ("general.quantized_by", "qkiln"),
        ]
        return kv

    def qkiln_items(self) -> list[tuple[str, Any]]:
        kv: list[tuple[str, Any]] = [
            ("qkiln.version", qkiln.__version__),
            ("qkiln.scheme", self.scheme),
            ("qkiln.algorithm", self.algorithm),
        ]
        if self.source:
            kv.append(("qkiln.source", self.source))
        if self.calibration_sha256:
            kv.append(("qkiln.calibration.sha256", self.calibration_sha256))
        if self.fallbacks:
            kv.append(("qkiln.fallbacks", list(self.fallbacks)))
        if self.tokenizer_scores:
            kv.append(("qkiln.tokenizer.scores", self.tokenizer_scores))
        return kv


def llama_hparams(config: LlamaConfig) -> list[tuple[str, Any]]:
    """The `llama.*` keys llama.cpp reads to build the graph."""
    kv: list[tuple[str, Any]] = [
        (f"{ARCH}.vocab_size", config.vocab_size),
        (f"{ARCH}.context_length", config.max_position_embeddings),
        (f"{ARCH}.embedding_length", config.hidden_size),
        (f"{ARCH}.feed_forward_length", config.intermediate_size),
        (f"{ARCH}.block_count", config.num_hidden_layers),
        (f"{ARCH}.attention.head_count", config.num_attention_heads),
        (f"{ARCH}.attention.head_count_kv", config.num_key_value_heads),
        (f"{ARCH}.rope.freq_base", float(config.rope_theta)),
        (f"{ARCH}.rope.dimension_count", config.head_dim),
        (f"{ARCH}.attention.layer_norm_rms_epsilon", float(config.rms_norm_eps)),
    ]
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        # llama.cpp assumes hidden/heads unless told otherwise.
        kv += [(f"{ARCH}.attention.key_length", config.head_dim), (f"{ARCH}.attention.value_length", config.head_dim)]
    if config.rope_scaling is not None:
        # llama.cpp's llama graph reads llama3 scaling from rope_freqs.weight alone (this key only matters for
        # YaRN); it is here so `import-gguf` recovers the exact llama3 parameters instead of assuming 8192.
        kv.append((f"{ARCH}.rope.scaling.original_context_length", config.rope_scaling.original_max_position_embeddings))
    return kv


def rope_freq_factors(config: LlamaConfig) -> np.ndarray | None:
    """`rope_freqs.weight` (head_dim/2,) float32 for `llama3` rope scaling, else None.

    llama.cpp has no `llama3` scaling mode: it divides each rotary frequency by a per-dimension
    factor read from this tensor. Factor 1 for short wavelengths, `factor` for long ones, a smooth
    blend in between — the same rule transformers applies to `inv_freq`.
    """
    rs = config.rope_scaling
    if rs is None:
        return None
    dim = config.head_dim
    freqs = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # (dim/2,)
    wavelen = 2 * math.pi / freqs
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    blended = 1.0 / ((1 - smooth) / rs.factor + smooth)
    factors = np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, rs.factor, blended))
    return factors.astype(np.float32)


# A whole-file type label for `general.file_type`: what llama.cpp's quantize would call this mix.
_FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
    "q4_0": LlamaFileType.MOSTLY_Q4_0,
    "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0,
    "q5_1": LlamaFileType.MOSTLY_Q5_1,
    "q4_k": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_s": LlamaFileType.MOSTLY_Q4_K_S,
    "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_S,
    "q5_k_s": LlamaFileType.MOSTLY_Q5_K_S,
    "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
    "q6_k": LlamaFileType.MOSTLY_Q6_K,
}


def file_type(preset: str, tensor_types: Iterable[GGMLQuantizationType]) -> int:
    """`general.file_type` for a preset name, else for the most common 2-D tensor type."""
    if preset.lower() in _FILE_TYPES:
        return int(_FILE_TYPES[preset.lower()])
    counts: dict[str, int] = {}
    for t in tensor_types:
        counts[t.name.lower()] = counts.get(t.name.lower(), 0) + 1
    for name, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if name in _FILE_TYPES:
            return int(_FILE_TYPES[name])
    return int(LlamaFileType.ALL_F32)
