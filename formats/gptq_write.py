"""The GPTQ safetensors layout (as GPTQModel writes it; vLLM's `gptq` / `gptq_marlin` and transformers read it).

For a Linear `m` of shape (out, in) on an integer grid with `bits` bits and groups of `g` columns
(g = in for per channel, written group_size −1), n_groups = in / g:
    m.qweight  int32 (in·bits/32, out)       code of input column c, output o at bits bits·(c % (32/bits)) of
                                             word [c // (32/bits), o], lowest bits first (packed along IN)
    m.qzeros   int32 (n_groups, out·bits/32) zero points packed along OUT the same way; checkpoint_format
                                             "gptq" (v1) stores zero − 1 (symmetric 4-bit: 0x77777777 words),
                                             "gptq_v2" stores the zero itself
    m.scales   float16 (n_groups, out)
    m.g_idx    int32 (in,)                   group of each input column: c // g (qkiln's groups are contiguous
                                             even with act-order — act-order only orders GPTQ's scan — so
                                             desc_act is false and g_idx is the identity grouping)
    w[o, c] = scales[g_idx[c], o] · (q[c, o] − zero[g_idx[c], o])

v1's "zero − 1" cannot hold a zero point of 0 (it wraps to 2**bits − 1, and v1 readers add 1 back
without wrapping), which asymmetric grids produce; so symmetric grids are written as v1, which every
reader takes, and asymmetric ones as gptq_v2, stated in `checkpoint_format`.

quantize_config.json and config.json's quantization_config hold the same block:
    bits, group_size, desc_act, sym, quant_method "gptq", checkpoint_format, pack_dtype "int32", lm_head.
One grid for every quantized Linear (the layout has one bits/group_size per model); embeddings, norms and
lm_head stay float16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.formats.compressed_tensors_write import config_dict, is_decoder_linear, module_of, pack_codes
from qkiln.formats.safetensors_folder import Blocks, dump_json, float16_tensor, write_folder
from qkiln.model.config import LlamaConfig
from qkiln.model.source import LazyRows
from qkiln.quantize.int_grid import IntGrid
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.tensor import QuantizedTensor

Weight: TypeAlias = QuantizedTensor | np.ndarray | LazyRows
MARLIN_GROUPS = (-1, 32, 64, 128)


def check_scheme(scheme: Scheme) -> IntGrid:
    """The integer grid, or QuantizeError for grids the GPTQ layout cannot hold (FP8, llama.cpp blocks)."""
    if not isinstance(scheme, IntGrid) or scheme.bits not in (4, 8):
        raise QuantizeError(
            f"the GPTQ layout holds 4- or 8-bit integer weights, not {scheme.name}; use int4_g32/g64/g128 "
            "(optionally _asym), int4_pc or int8 — or --to compressed-tensors for FP8"
        )
    return scheme


def checkpoint_format(scheme: IntGrid) -> str:
    return "gptq" if scheme.symmetric else "gptq_v2"


def group_size(scheme: IntGrid) -> int:
    return scheme.group or -1


def pack_tensor(hf_name: str, qt: QuantizedTensor) -> Iterator[tuple[str, np.ndarray]]:
    scheme = check_scheme(qt.scheme)
    m = module_of(hf_name)
    out, cols = qt.shape
    bits, mask = scheme.bits, (1 << scheme.bits) - 1
    n_groups = scheme.n_groups(cols)
    if scheme.symmetric:
        zero = np.full((out, n_groups), scheme.shift, dtype=np.int32)
    else:
        zero = qt.params["zero"].astype(np.int32)  # (out, n_groups)
    if checkpoint_format(scheme) == "gptq":
        zero = (zero - 1) & mask
    yield f"{m}.qweight", pack_codes(qt.codes.T, bits, axis=0)  # (in·bits/32, out)
    yield f"{m}.qzeros", pack_codes(zero.T.astype(np.uint8), bits, axis=1)  # (n_groups, out·bits/32)
    yield f"{m}.scales", np.ascontiguousarray(qt.params["scale"].astype(np.float16).T)  # (n_groups, out)
    yield f"{m}.g_idx", (np.arange(cols) // (scheme.group or cols)).astype(np.int32)


def gptq_config(scheme: IntGrid) -> dict[str, Any]:
    return {
        "bits": scheme.bits,
        "group_size": group_size(scheme),
        "desc_act": False,
        "sym": scheme.symmetric,
        "quant_method": "gptq",
        "checkpoint_format": checkpoint_format(scheme),
        "pack_dtype": "int32",
        "lm_head": False,
        "true_sequential": True,
        "meta": {"quantizer": ["qkiln:0.1.0"]},
    }


def marlin_blockers(scheme: IntGrid, shapes: Iterable[tuple[int, int]]) -> list[str]:
    """Why vLLM's gptq_marlin (H100) cannot run this artifact; empty when it can."""
    why = []
    if not scheme.symmetric:
        why.append("asymmetric zero points (gptq_marlin takes symmetric GPTQ only)")
    if group_size(scheme) not in MARLIN_GROUPS:
        why.append(f"group size {group_size(scheme)} (gptq_marlin takes -1, 32, 64, 128)")
    ins = sorted({c for _, c in shapes if c % 128})
    if ins:
        why.append(f"input features {', '.join(map(str, ins))} not a multiple of 128")
    outs = sorted({o for o, _ in shapes if o % 64})
    if outs:
        why.append(f"output features {', '.join(map(str, outs))} not a multiple of 64")
    return why


def marlin_warning(scheme: IntGrid, shapes: Iterable[tuple[int, int]]) -> str | None:
    why = marlin_blockers(scheme, shapes)
    if not why:
        return None
    return ("vLLM on H100 cannot use the gptq_marlin kernel for this artifact (" + "; ".join(why)
            + "); it falls back to the exllama `gptq` kernel (slower). On ROCm (MI300) vLLM always uses `gptq`.")


def write_gptq(
    dest: str | Path,
    weights: Iterable[tuple[str, Weight]],
    config: LlamaConfig,
    *,
    tokenizer_from: Path | None = None,
    card: Callable[[dict[str, Any]], str] | None = None,
    overwrite: bool = False,
    shard_bytes: int | None = None,
) -> tuple[IntGrid | None, list[tuple[int, int]]]:
    """Write a GPTQ-layout folder from `weights` in the quantizer's order; (grid, quantized shapes)."""
    state: dict[str, Any] = {"scheme": None, "shapes": []}

    def tensors() -> Iterator[tuple[str, np.ndarray | Blocks]]:
        for name, w in weights:
            if isinstance(w, QuantizedTensor):
                if not is_decoder_linear(name):
                    raise QuantizeError(f"{name}: the GPTQ layout quantizes the decoder's Linear layers only")
                scheme = check_scheme(w.scheme)
                if state["scheme"] is None:
                    state["scheme"] = scheme
                elif state["scheme"] != scheme:
                    raise QuantizeError(
                        f"{name} is on {scheme.name} but earlier layers on {state['scheme'].name}: the GPTQ layout "
                        "has one grid per model; choose a group size that divides every row"
                    )
                state["shapes"].append(w.shape)
                yield from pack_tensor(name, w)
            else:
                yield name, float16_tensor(w)

    def qconfig() -> dict[str, Any]:
        if state["scheme"] is None:
            raise QuantizeError("no tensor was quantized; the GPTQ layout needs an integer scheme")
        return gptq_config(state["scheme"])

    files = {"quantize_config.json": lambda: dump_json(qconfig()), "README.md": lambda: card(qconfig()) if card else ""}
    write_folder(dest, tensors(), lambda: config_dict(config, qconfig(), "float16"), tokenizer_from=tokenizer_from,
                 files=files, overwrite=overwrite, shard_bytes=shard_bytes)
    return state["scheme"], state["shapes"]
