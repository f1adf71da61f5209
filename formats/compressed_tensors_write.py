"""compressed-tensors safetensors (vLLM, SGLang, transformers + `compressed-tensors`), packed from qkiln's codes.

Two formats of the `compressed-tensors` package (its `CompressionFormat`), each exactly as its compressors
store it, so its own decompression gives back `QuantizedTensor.dequantize()` bit for bit:

pack-quantized (W4A16, W8A16 — integer weights, float activations), for a Linear `m` of shape (out, in):
    m.weight_packed      int32 (out, in·bits/32)   value v of column c at bits bits·(c % (32/bits)) of word
                                                  c // (32/bits), stored as v + 2**(bits-1) (offset binary),
                                                  lowest bits first — qkiln's unsigned code is that number
    m.weight_scale       float16 (out, n_groups)   per group (strategy "group") or (out, 1) per channel
    m.weight_shape       int32 (2,)                [out, in]
    m.weight_zero_point  int32 (ceil(out·bits/32), n_groups)   asymmetric only: zero − 2**(bits-1) packed
                                                  the same way along the OUTPUT dimension
  and w = (v − zp) · scale, i.e. (code − zero) · scale, qkiln's IntGrid.decode.
float-quantized (FP8 W8A8, FP8_DYNAMIC preset):
    m.weight             F8_E4M3 (out, in)         the codes as they are (OCP E4M3FN)
    m.weight_scale       float32 (out, 1)          per channel ((1,) per tensor); w = fp8 · scale
  activations quantized per token at run time (declared in the config, nothing stored).

Scales are float16 for integer grids (what qkiln's grids store), so the model dtype is float16: vLLM
creates the scale parameters in the model dtype, and any other dtype would round them. FP8 scales stay
float32 (vLLM's FP8 layers hold float32 scales). Unquantized tensors (embeddings, norms, lm_head) are
float16. Only the decoder's Linear layers are quantized; every other Linear (lm_head) is in `ignore`.

No FP8 byte is 0x80 (−0): on AMD MI300 vLLM reinterprets E4M3FN bytes as E4M3FNUZ, where 0x80 is NaN
(`normalize_e4m3fn_to_e4m3fnuz` maps it to 0; we never depend on that) — see `fp8_fnuz_equivalent`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import ml_dtypes
import numpy as np

from qkiln.errors import QuantizeError
from qkiln.formats.safetensors_folder import Blocks, float16_tensor, write_folder
from qkiln.model.config import LlamaConfig
from qkiln.model.source import LazyRows
from qkiln.quantize.fp8 import FP8Grid
from qkiln.quantize.int_grid import IntGrid
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.tensor import QuantizedTensor

# The compressed-tensors version whose config schema and packing this writer follows; 4- and 8-bit
# packing is the same from 0.17 (what vLLM 0.33 pins) to 0.20.
CT_VERSION = "0.20.1"
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Weight: TypeAlias = QuantizedTensor | np.ndarray | LazyRows


def pack_codes(codes: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Unsigned `codes` (uint8, each < 2**bits) packed into int32 words along `axis` (0 or 1), lowest bits
    first; a partial last word is padded with code 0 (compressed-tensors' and GPTQ's rule)."""
    per_word = 32 // bits
    c = np.moveaxis(codes, axis, -1).astype(np.uint32)  # (..., n)
    pad = -c.shape[-1] % per_word
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint32)], axis=-1)
    c = c.reshape(*c.shape[:-1], -1, per_word)  # (..., n_words, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))
    words = np.bitwise_or.reduce(c << shifts, axis=-1)  # (..., n_words) uint32
    return np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis))


def unpack_codes(words: np.ndarray, bits: int, axis: int, n: int) -> np.ndarray:
    """Inverse of `pack_codes`: uint8 codes with `n` entries along `axis`."""
    per_word = 32 // bits
    w = np.moveaxis(words, axis, -1).view(np.uint32)[..., None]  # (..., n_words, 1)
    c = (w >> (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))) & np.uint32((1 << bits) - 1)
    c = c.reshape(*c.shape[:-2], -1)[..., :n]
    return np.ascontiguousarray(np.moveaxis(c.astype(np.uint8), -1, axis))


def module_of(hf_name: str) -> str:
    return hf_name.removesuffix(".weight")


def is_decoder_linear(hf_name: str) -> bool:
    return re.fullmatch(rf"model\.layers\.\d+\.(self_attn|mlp)\.({'|'.join(LINEAR_SUFFIXES)})\.weight", hf_name) is not None


def check_scheme(scheme: Scheme) -> None:
    """Refuse a grid compressed-tensors cannot express (before any quantization work)."""
    if isinstance(scheme, IntGrid):
        return
    if isinstance(scheme, FP8Grid):
        if scheme.fmt != "e4m3fn":
            raise QuantizeError(
                f"{scheme.name}: no loader takes E4M3FNUZ bytes; write fp8_e4m3fn (OCP), which vLLM converts "
                "exactly to E4M3FNUZ when it loads the model on AMD MI300"
            )
        return
    raise QuantizeError(
        f"{scheme.name} has no compressed-tensors format; use int4_g32/g64/g128 (optionally _asym), int4_pc, "
        "int8 (pack-quantized) or fp8_e4m3fn (float-quantized)"
    )


def scheme_args(scheme: Scheme) -> dict[str, Any]:
    """The config group (format, weights, input_activations) compressed-tensors' pydantic models accept:
    its presets (FP8_DYNAMIC; W4A16/W4A16_ASYM/W8A16 with our group size) field for field. `observer` is
    null: qkiln's grids are fitted by its own rules, not by a compressed-tensors observer."""
    check_scheme(scheme)
    if isinstance(scheme, FP8Grid):
        return {
            "format": "float-quantized",
            "weights": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
                        "strategy": "tensor" if scheme.tensor_scale else "channel", "group_size": None,
                        "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}},
            "input_activations": {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True,
                                  "strategy": "token", "group_size": None, "actorder": None, "block_structure": None,
                                  "observer": None, "observer_kwargs": {}},
            "output_activations": None,
        }
    assert isinstance(scheme, IntGrid)
    return {
        "format": "pack-quantized",
        "weights": {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric, "dynamic": False,
                    "strategy": "group" if scheme.group else "channel", "group_size": scheme.group or None,
                    # qkiln's act-order changes only GPTQ's scan; groups stay contiguous, so no g_idx
                    "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}},
        "input_activations": None,
        "output_activations": None,
    }


def fp8_bytes(qt: QuantizedTensor) -> np.ndarray:
    """The E4M3FN codes with −0 (0x80) written as +0 (0x00): the same value on every reader, and never
    the FNUZ NaN when MI300 reinterprets the bytes."""
    codes = qt.codes
    if (codes == 0x80).any():
        codes = np.where(codes == 0x80, np.uint8(0), codes)
    return codes


def pack_tensor(hf_name: str, qt: QuantizedTensor) -> Iterator[tuple[str, np.ndarray]]:
    """The stored tensors of one quantized Linear."""
    m = module_of(hf_name)
    scheme = qt.scheme
    out, cols = qt.shape
    if isinstance(scheme, FP8Grid):
        scale = qt.params["scale"].astype(np.float32)  # (out, 1)
        yield f"{m}.weight", fp8_bytes(qt).view(ml_dtypes.float8_e4m3fn)
        yield f"{m}.weight_scale", scale[:1, 0].copy() if scheme.tensor_scale else scale
        return
    assert isinstance(scheme, IntGrid), scheme
    yield f"{m}.weight_packed", pack_codes(qt.codes, scheme.bits, axis=1)  # (out, in·bits/32)
    yield f"{m}.weight_scale", qt.params["scale"].astype(np.float16)  # (out, n_groups)
    yield f"{m}.weight_shape", np.array([out, cols], dtype=np.int32)
    if not scheme.symmetric:
        yield f"{m}.weight_zero_point", pack_codes(qt.params["zero"], scheme.bits, axis=0)  # (out/8, n_groups)


def quantization_config(schemes: dict[str, Scheme], linear_modules: list[str]) -> dict[str, Any]:
    """The `quantization_config` block: one config group per grid; every Linear not quantized is ignored."""
    by_scheme: dict[str, list[str]] = {}
    for hf_name, s in schemes.items():
        by_scheme.setdefault(s.name, []).append(module_of(hf_name))
    quantized = {module_of(n) for n in schemes}
    groups: dict[str, Any] = {}
    single = len(by_scheme) == 1
    for i, (name, modules) in enumerate(sorted(by_scheme.items())):
        scheme = schemes[next(n for n in schemes if schemes[n].name == name)]
        groups[f"group_{i}"] = {"targets": ["Linear"] if single else sorted(modules), **scheme_args(scheme)}
    formats = sorted({g["format"] for g in groups.values()})
    return {
        "quant_method": "compressed-tensors",
        "format": formats[0] if len(formats) == 1 else "mixed-precision",
        "config_groups": groups,
        "ignore": sorted(m for m in linear_modules if m not in quantized),
        "quantization_status": "compressed",
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }


def linear_modules(config: LlamaConfig) -> list[str]:
    """Every Linear of the model (the decoder's seven per layer and lm_head, tied or not)."""
    out = []
    for i in range(config.num_hidden_layers):
        for s in LINEAR_SUFFIXES:
            out.append(f"model.layers.{i}.{'self_attn' if s in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{s}")
    return [*out, "lm_head"]


def config_dict(config: LlamaConfig, qconfig: dict[str, Any], torch_dtype: str) -> dict[str, Any]:
    d = config.to_dict()
    d["torch_dtype"] = torch_dtype
    d["dtype"] = torch_dtype  # transformers 5 reads `dtype`
    d["quantization_config"] = qconfig
    return d


def write_compressed_tensors(
    dest: str | Path,
    weights: Iterable[tuple[str, Weight]],
    config: LlamaConfig,
    *,
    tokenizer_from: Path | None = None,
    card: Callable[[dict[str, Any]], str] | None = None,
    overwrite: bool = False,
    shard_bytes: int | None = None,
) -> dict[str, Scheme]:
    """Write a compressed-tensors folder from `weights` (hf_name, QuantizedTensor | float32 array) in the
    quantizer's order; returns the grid of every quantized tensor. `card(quantization_config)` gives README.md."""
    schemes: dict[str, Scheme] = {}

    def tensors() -> Iterator[tuple[str, np.ndarray | Blocks]]:
        for name, w in weights:
            if isinstance(w, QuantizedTensor):
                if not is_decoder_linear(name):
                    raise QuantizeError(f"{name}: compressed-tensors quantizes Linear layers only; keep it in float")
                check_scheme(w.scheme)
                schemes[name] = w.scheme
                yield from pack_tensor(name, w)
            else:
                yield name, float16_tensor(w)

    holder: dict[str, Any] = {}

    def make_config() -> dict[str, Any]:
        holder["q"] = quantization_config(schemes, linear_modules(config))
        return config_dict(config, holder["q"], "float16")

    files = {"README.md": (lambda: card(holder["q"]) if card else "")}
    write_folder(dest, tensors(), make_config, tokenizer_from=tokenizer_from, files=files, overwrite=overwrite,
                 shard_bytes=shard_bytes)
    return schemes
