"""A deterministic, streaming safetensors writer.

The `safetensors` package keeps `__metadata__` in a hash map, so two saves of the same tensors with more
than one metadata key can differ in bytes; it also needs every tensor in memory at once. This writer lays
the file out itself (the format is small: an 8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8, then the raw little-endian data) with keys in sorted order, and writes one tensor
(or one block of a tensor) at a time, so outputs are byte-identical for identical inputs and memory stays at
one tensor, or one block.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

# numpy dtype -> safetensors dtype name
DTYPE_NAMES: dict[np.dtype, str] = {
    np.dtype(np.float64): "F64",
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8",
    np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}

# A tensor is given as an array, or as (dtype, shape, producer) so it is computed only when written; the
# producer returns the array, or its data in order as blocks (any shapes, that dtype): never whole in memory.
TensorSpec = np.ndarray | tuple[np.dtype, tuple[int, ...], Callable[[], np.ndarray | Iterable[np.ndarray]]]


def _spec(t: TensorSpec) -> tuple[np.dtype, tuple[int, ...]]:
    if isinstance(t, np.ndarray):
        return t.dtype, t.shape
    return np.dtype(t[0]), tuple(t[1])


def write_safetensors(path: str | Path, tensors: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (sorted by name) to `path`. The caller makes it atomic (qkiln.atomic)."""
    names = sorted(tensors)
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name in names:
        dtype, shape = _spec(tensors[name])
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors name")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            t = tensors[name]
            dtype, shape = _spec(t)
            made = t if isinstance(t, np.ndarray) else t[2]()
            if isinstance(made, np.ndarray) and made.shape != shape:
                raise ValueError(f"{name}: produced {made.dtype}{made.shape}, declared {dtype}{shape}")
            written = 0
            for arr in [made] if isinstance(made, np.ndarray) else made:
                if arr.dtype != dtype:
                    raise ValueError(f"{name}: produced {arr.dtype}, declared {dtype}")
                arr = np.ascontiguousarray(arr)
                if arr.dtype.byteorder == ">":
                    arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
                f.write(arr.reshape(-1).view(np.uint8).data)
                written += arr.nbytes
            if written != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(f"{name}: produced {written} bytes, declared {dtype}{shape}")
