"""QuantizedTensors as linear ops on their packed form: the C kernels run a quantized model in memory.

`packed_linear_from_quantized(qt)` gives a `kernels.linear.PackedLinear` on the ggml blocks of a llama.cpp
grid, or `kernels.api.Int4GLinear` for INT4 grids; `plug_quantized` plugs them into a `LlamaModel`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from qkiln.errors import QuantizeError
from qkiln.kernels import api
from qkiln.kernels.linear import BLOCK, KERNEL_TYPES, PackedLinear
from qkiln.kernels.types import WType
from qkiln.quantize.ggml_pack import ggml_type_name, pack_blocks
from qkiln.quantize.int_grid import IntGrid


def packed_linear_from_quantized(qt, nthreads: int | None = None):
    """A QuantizedTensor -> a linear op on its packed form: PackedLinear on its ggml blocks for llama.cpp grids
    (quantize/ggml_pack.py), `api.Int4GLinear` for INT4 grids (per group or per channel, zero point or
    symmetric; INT4GX8 on AVX-512), or None when no kernel fits (the caller keeps the dense weight)."""
    int4 = int4_linear_from_quantized(qt, nthreads)
    if int4 is not None:
        return int4
    try:
        tid = int(GGMLQuantizationType[ggml_type_name(qt.scheme.name)])
    except QuantizeError:
        return None
    rows, cols = qt.shape
    if tid not in KERNEL_TYPES or cols % BLOCK[WType(tid)][0]:
        return None
    return PackedLinear(WType(tid), np.ascontiguousarray(pack_blocks(qt)).reshape(-1), rows, cols, nthreads)


def int4_linear_from_quantized(qt, nthreads: int | None = None) -> api.Int4GLinear | None:
    """INT4 codes (rows, cols) 0..15 with fp16 scales (and zero points) per group -> the INT4 kernel's arrays:
    codes in Q4_0's nibble order per 32 columns, fp32 scales (exact), zeros (8 for symmetric grids)."""
    scheme = qt.scheme
    rows, cols = qt.shape
    if not isinstance(scheme, IntGrid) or scheme.bits != 4 or cols % 32:
        return None
    group = scheme.group or cols
    if group % 32 or cols % group:
        return None
    q = np.asarray(qt.codes, np.uint8).reshape(rows, cols // 32, 2, 16)  # (rows, blocks, half, 16)
    codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(rows, cols // 2)  # byte j = elem j | elem j + 16 << 4
    scales = np.asarray(qt.params["scale"], np.float32).reshape(rows, cols // group)
    zeros = (np.asarray(qt.params["zero"], np.uint8) if not scheme.symmetric
             else np.full(scales.shape, scheme.shift, np.uint8)).reshape(rows, cols // group)
    return api.Int4GLinear(codes, scales, zeros, group, rows, cols, nthreads)


def plug_quantized(model, tensors: dict, nthreads: int | None = None) -> list[str]:
    """Plug a packed op for every (HF weight or module name -> QuantizedTensor) with a kernel; returns the
    names that stayed dense (replace those with `model.replace_tensor(name, qt.dequantize())`)."""
    dense = []
    for name, qt in tensors.items():
        op = packed_linear_from_quantized(qt, nthreads)
        if op is None:
            dense.append(name)
        else:
            model.set_linear(name.removesuffix(".weight"), op)
    return dense
