"""Parse and validate a safetensors header before trusting a single offset in it.

A safetensors file is `u64 little-endian header length N`, `N bytes of JSON`, then the data section.
The JSON maps tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` (offsets relative to
the data section) plus an optional `"__metadata__"` of strings. Everything a reader later does with
`np.memmap` (offset, length, dtype) comes from that JSON, so a malformed or truncated file must be
refused here with a one-line `CheckpointError` — otherwise it surfaces as a reshape error, garbage
values, or a SIGBUS when a page past the end of the file is touched.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
from pathlib import Path
from typing import Any

from qkiln.errors import CheckpointError

# Bits per element of every dtype the safetensors format defines (sub-byte float types included),
# so any valid file passes the size checks even if qkiln cannot convert that dtype.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "F64": 64,
    "I64": 64,
    "U64": 64,
    "C64": 64,
}

# The reference implementation refuses headers above 100 MB; a larger length is a corrupt file,
# and refusing it keeps us from allocating gigabytes to read "JSON".
MAX_HEADER_BYTES = 100_000_000


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes are: `offset` is absolute in the file, `nbytes` its length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: every entry's bytes lie inside the file and no two entries overlap."""

    path: Path
    file_size: int
    data_start: int  # absolute offset of the data section (8 + header length)
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _is_uint(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, spec: Any, data_start: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where} must be a JSON object with dtype, shape and data_offsets")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointError(f"{where} has unknown dtype {dtype!r}; the file is not valid safetensors")
    if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {shape!r} (expected a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
        raise CheckpointError(f"{where} has invalid data_offsets {offsets!r} (expected [begin, end])")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where} has data_offsets [{begin}, {end}] with end before begin")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise CheckpointError(
            f"{where}: data_offsets span {end - begin} bytes but shape {tuple(shape)} of {dtype} "
            f"needs {bits / 8:g}; the header is corrupt"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=end - begin)


def read_header(path: str | Path) -> SafetensorsHeader:
    """Read and check `path`'s header; raise `CheckpointError` naming the file and the defect.

    Only the header is read (at most `MAX_HEADER_BYTES`), never the data section.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: file is {file_size} bytes, too short to be safetensors (truncated or not safetensors)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > file_size - 8:
                raise CheckpointError(
                    f"{path}: header length {n} is larger than the file ({file_size} bytes); "
                    "the file is truncated or not safetensors"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path}: header length {n} exceeds {MAX_HEADER_BYTES} bytes; the file is corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: header is not valid JSON ({e}); the file is corrupt or not safetensors") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: header must be a JSON object; the file is corrupt or not safetensors")

    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings")

    data_start = 8 + n
    data_len = file_size - data_start
    entries = {name: _parse_entry(path, name, spec, data_start) for name, spec in doc.items()}

    ordered = sorted(entries.values(), key=lambda e: (e.offset, e.nbytes))
    for prev, cur in itertools.pairwise(ordered):
        if cur.offset < prev.offset + prev.nbytes:
            raise CheckpointError(
                f"{path}: tensors {prev.name!r} and {cur.name!r} overlap in the data section; the header is corrupt"
            )
    need = max((e.offset + e.nbytes - data_start for e in ordered), default=0)
    if need > data_len:
        last = max(ordered, key=lambda e: e.offset + e.nbytes)
        raise CheckpointError(
            f"{path}: file is truncated: data section has {data_len} bytes but tensor {last.name!r} "
            f"ends at {need}; download or copy it again"
        )
    return SafetensorsHeader(path=path, file_size=file_size, data_start=data_start, tensors=entries, metadata=metadata)
