"""Import a llama GGUF file as a Hugging Face checkpoint folder (F32 safetensors + config + tokenizer).

Why: the demo model ships only as a GGUF, and a GGUF is what many users have. Every tensor is
dequantized with gguf-py's reference dequantizers, llama.cpp's q/k rotary permutation is undone, and the
hyper-parameters and tokenizer are rebuilt from the metadata, so the folder loads in transformers and in
qkiln's own reader like any other checkpoint. The result is written atomically: on any failure nothing
appears at the destination.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf.quants import dequantize

from qkiln.errors import CheckpointError, GGUFError, UserError
from qkiln.formats.gguf_read import GGUFFile, GGUFTensor, read_gguf
from qkiln.formats.hf_write import write_checkpoint
from qkiln.formats.tokenizer_gguf import tokenizer_files
from qkiln.hashing import sha256_file
from qkiln.model.config import LlamaConfig, RopeScaling
from qkiln.model.names import (
    GGUF_DERIVED,
    expected_shapes,
    gguf_to_hf_name,
    is_k_proj,
    is_q_proj,
    unpermute_qk,
)

# Bumped when the imported folder's content changes, so cached imports (the demo model) are redone.
IMPORT_FORMAT_VERSION = 1
SOURCE_FILE = "qkiln_source.json"
ARCH = "llama"

Progress = Callable[[str, int, int], None]  # (tensor name, index done, total)


def _f32(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _int(f: GGUFFile, key: str, default: int | None = None) -> int:
    if key not in f.metadata and default is not None:
        return default
    value = f.require(key, int)
    if value <= 0:
        raise GGUFError(f"{f.path}: metadata '{key}' is {value}; it must be positive")
    return int(value)


def _llama3_from_rope_freqs(f: GGUFFile, freqs: np.ndarray, head_dim: int, theta: float) -> RopeScaling | None:
    """Recover `rope_scaling` of type llama3 from llama.cpp's per-frequency divisor tensor.

    llama.cpp's converter stores, per rotary frequency, 1 (short wavelengths), `factor` (long ones) or
    1 / ((1 - s) / factor + s) in between, where s = (orig_ctx / wavelength - low) / (high - low).
    With orig_ctx from the metadata (Llama 3's 8192 when absent), low and high follow from a line fit
    through the in-between points; the parameters are accepted only if they reproduce every value.
    """
    rf = freqs.astype(np.float64).reshape(-1)  # (head_dim // 2,)
    if rf.shape[0] != head_dim // 2 or not np.all(np.isfinite(rf)) or np.any(rf <= 0):
        raise GGUFError(f"{f.path}: rope_freqs.weight has {rf.shape[0]} entries or invalid values; expected {head_dim // 2}")
    if np.allclose(rf, 1.0):
        return None
    orig = _int(f, f"{ARCH}.rope.scaling.original_context_length", 8192)
    factor = float(rf.max())
    inv_freq = theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # (head_dim // 2,)
    wavelen = 2 * math.pi / inv_freq
    mid = (rf > 1 + 1e-6) & (rf < factor * (1 - 1e-6))
    if mid.sum() < 2:
        raise GGUFError(
            f"{f.path}: rope_freqs.weight has fewer than two interpolated frequencies, so its llama3 "
            "low/high frequency factors cannot be recovered; this GGUF's rope scaling is not supported"
        )
    s = (1 / rf[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(orig / wavelen[mid], s, 1)
    low = -intercept / slope
    high = low + 1 / slope
    # Round to the nearest 1/1000: the published factors are short decimals.
    low, high = round(float(low), 3), round(float(high), 3)
    low_wl, high_wl = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    expect = np.where(wavelen < high_wl, 1.0,
                      np.where(wavelen > low_wl, factor, 1 / ((1 - smooth) / factor + smooth)))
    if not np.allclose(expect, rf, rtol=1e-4, atol=0):
        raise GGUFError(f"{f.path}: rope_freqs.weight does not follow llama3 rope scaling; it is not supported")
    return RopeScaling(factor=_f32(factor), low_freq_factor=low, high_freq_factor=high,
                       original_max_position_embeddings=orig)


def config_from_gguf(f: GGUFFile) -> LlamaConfig:
    """The Llama hyper-parameters from `llama.*` metadata (and rope_freqs.weight for llama3 scaling)."""
    arch = f.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(
            f"{f.path}: architecture {arch!r} is not supported; qkiln imports only '{ARCH}' GGUF files"
        )
    if f.get(f"{ARCH}.expert_count", 0):
        raise GGUFError(f"{f.path}: mixture-of-experts llama models are not supported")
    hidden = _int(f, f"{ARCH}.embedding_length")
    n_head = _int(f, f"{ARCH}.attention.head_count")
    n_kv = _int(f, f"{ARCH}.attention.head_count_kv", n_head)
    head_dim = _int(f, f"{ARCH}.attention.key_length", hidden // n_head)
    if _int(f, f"{ARCH}.attention.value_length", head_dim) != head_dim:
        raise GGUFError(f"{f.path}: attention key and value lengths differ; not a plain llama model")
    if head_dim % 2:
        raise GGUFError(f"{f.path}: attention head size {head_dim} is odd; rotary embeddings need an even size")
    rope_dim = _int(f, f"{ARCH}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise GGUFError(f"{f.path}: partial rotary embeddings (rope dimension {rope_dim} of head {head_dim}) are not supported")
    theta = _f32(f.require(f"{ARCH}.rope.freq_base", (float, int))) if f"{ARCH}.rope.freq_base" in f.metadata else 10000.0
    scaling_type = f.get(f"{ARCH}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise GGUFError(f"{f.path}: rope scaling type {scaling_type!r} is not supported (only llama3 via rope_freqs)")
    rope_scaling = None
    if "rope_freqs.weight" in f.tensors:
        t = f.tensors["rope_freqs.weight"]
        rope_scaling = _llama3_from_rope_freqs(f, dequantize_tensor(f, t), head_dim, theta)
    tokens = f.get("tokenizer.ggml.tokens")
    embd = f.tensors.get("token_embd.weight")
    vocab = _int(f, f"{ARCH}.vocab_size", len(tokens) if isinstance(tokens, list) and tokens else
                 (embd.shape[0] if embd is not None else 0) or 1)
    eps = f.get(f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-5)
    if not isinstance(eps, float) or not eps > 0:
        raise GGUFError(f"{f.path}: layer_norm_rms_epsilon {eps!r} must be a positive float")

    def token_id(name: str) -> int | None:
        v = f.get(f"tokenizer.ggml.{name}_token_id")
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_int(f, f"{ARCH}.feed_forward_length"),
            num_hidden_layers=_int(f, f"{ARCH}.block_count"),
            num_attention_heads=n_head,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=_f32(eps),
            rope_theta=theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=_int(f, f"{ARCH}.context_length", 2048),
            tie_word_embeddings="output.weight" not in f.tensors,
            bos_token_id=token_id("bos"),
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("padding"),
        )
    except CheckpointError as e:
        raise GGUFError(f"{f.path}: {e}") from None


def dequantize_tensor(f: GGUFFile, t: GGUFTensor) -> np.ndarray:
    try:
        out = dequantize(t.data, t.ggml_type)
    except NotImplementedError:
        raise GGUFError(
            f"{f.path}: tensor '{t.name}' has type {t.ggml_type.name}, which gguf-py cannot dequantize; "
            "re-quantize the model to a supported type"
        ) from None
    return np.array(out, dtype=np.float32).reshape(t.shape)  # a fresh copy, not a view of the file


def load_llama_tensors(f: GGUFFile, cfg: LlamaConfig, progress: Progress | None = None) -> dict[str, np.ndarray]:
    """Every weight as float32 under its HF name, q/k rows back in HF's rotate_half order."""
    shapes = expected_shapes(cfg, with_head=True)
    names = [n for n in f.tensors if n not in GGUF_DERIVED]
    mapped: dict[str, str] = {}
    for name in names:
        try:
            mapped[name] = gguf_to_hf_name(name, cfg.num_hidden_layers)
        except KeyError:
            raise GGUFError(f"{f.path}: tensor '{name}' is not part of a {cfg.num_hidden_layers}-layer llama model") from None
        want, got = shapes[mapped[name]], f.tensors[name].shape
        if got != want:
            raise GGUFError(f"{f.path}: tensor '{name}' has shape {list(got)}, expected {list(want)} from the metadata")
    missing = sorted(set(shapes) - set(mapped.values()) - {"lm_head.weight"})
    if missing:
        raise GGUFError(f"{f.path}: {len(missing)} llama tensors are missing, e.g. '{missing[0]}'")
    out: dict[str, np.ndarray] = {}
    for k, name in enumerate(names):
        hf = mapped[name]
        w = dequantize_tensor(f, f.tensors[name])
        if is_q_proj(hf):
            w = unpermute_qk(w, cfg.num_attention_heads)
        elif is_k_proj(hf):
            w = unpermute_qk(w, cfg.num_attention_heads, cfg.num_key_value_heads)
        out[hf] = w
        if progress is not None:
            progress(name, k + 1, len(names))
    return out


def import_gguf(src: Path, dest: Path, *, overwrite: bool = False, progress: Progress | None = None) -> Path:
    """Write `dest/` as an F32 Hugging Face checkpoint of the llama GGUF `src`; returns dest.

    Everything that can be wrong with the input is checked before the folder is started; the folder
    itself appears only once complete (`write_checkpoint` is atomic).
    """
    src, dest = Path(src), Path(dest)
    f = read_gguf(src)
    cfg = config_from_gguf(f)
    extra = tokenizer_files(f.metadata, where=str(src), model_max_length=cfg.max_position_embeddings)
    if dest.exists() and not overwrite:
        raise UserError(f"output {dest} already exists; remove it or pass --force")
    tensors = load_llama_tensors(f, cfg, progress)
    source: dict[str, Any] = {"importer_version": IMPORT_FORMAT_VERSION, "source_file": src.name,
                              "source_bytes": f.file_size, "source_sha256": sha256_file(src),
                              "gguf_name": f.get("general.name")}
    extra[SOURCE_FILE] = json.dumps(source, indent=2, sort_keys=True) + "\n"
    # No extra safetensors metadata: safetensors stores it in a hash map, so two keys or more would
    # come out in a different order from run to run (the provenance lives in qkiln_source.json).
    return write_checkpoint(dest, cfg, sorted(tensors.items()), extra_files=extra, overwrite=overwrite)
