"""Read a GGUF file without ever crashing on bad input.

gguf-py's `GGUFReader` trusts the header: a corrupt length makes it raise an arbitrary numpy error or
read garbage. qkiln parses the header itself and checks every count, string length, array size and
tensor extent against the file size before touching data, so a truncated or damaged file gives one
`GGUFError` line that says what is wrong. Tensor data are `np.memmap` views (nothing is read until
used); gguf-py stays the reference for the type table and the block dequantizers.

Layout (little-endian, versions 2 and 3): magic "GGUF", u32 version, u64 tensor count, u64 kv count;
kv pairs (string key, u32 value type, value); tensor infos (string name, u32 n_dims, u64 dims[n_dims]
innermost first, u32 ggml type, u64 offset); padding to `general.alignment` (default 32); tensor data,
each tensor at data_start + offset.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from qkiln.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
HEADER_BYTES = 24  # magic, version, tensor count, kv count

# Fixed-size scalar value types: (struct format, numpy dtype).
_SCALARS: dict[GGUFValueType, tuple[str, str]] = {
    GGUFValueType.UINT8: ("<B", "<u1"),
    GGUFValueType.INT8: ("<b", "<i1"),
    GGUFValueType.UINT16: ("<H", "<u2"),
    GGUFValueType.INT16: ("<h", "<i2"),
    GGUFValueType.UINT32: ("<I", "<u4"),
    GGUFValueType.INT32: ("<i", "<i4"),
    GGUFValueType.FLOAT32: ("<f", "<f4"),
    GGUFValueType.BOOL: ("<?", "u1"),
    GGUFValueType.UINT64: ("<Q", "<u8"),
    GGUFValueType.INT64: ("<q", "<i8"),
    GGUFValueType.FLOAT64: ("<d", "<f8"),
}
# Smallest encoding of one value of each type (a string is at least its u64 length; an array its
# u32 type + u64 count): the bound that makes a count "plausible" for the bytes that remain.
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, (f, _) in _SCALARS.items()}, GGUFValueType.STRING: 8,
                    GGUFValueType.ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file.

    `shape` is in numpy order (outermost first; GGUF stores dims innermost first). `data` is a
    read-only uint8 memmap view shaped `(*shape[:-1], bytes_per_row)`, the layout
    `gguf.quants.dequantize` takes for every type.
    """

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    data: np.ndarray = dataclasses.field(repr=False, compare=False)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> python value) and `tensors` (name -> GGUFTensor).

    Numeric arrays in metadata come back as Python lists; strings as `str`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._where = str(path)
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            raise GGUFError(f"{self._where}: no such file") from None
        except OSError as e:
            raise GGUFError(f"{self._where}: cannot read ({e.strerror})") from None
        if self.path.is_dir():
            raise GGUFError(f"{self._where}: is a folder, not a GGUF file")
        self.file_size = size
        if size < 4:
            raise GGUFError(f"{self._where}: not a GGUF file (only {size} bytes)")
        try:
            self._mm: np.ndarray = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as e:
            raise GGUFError(f"{self._where}: cannot read ({e})") from None
        self._buf = memoryview(self._mm)  # type: ignore[arg-type]
        self._pos = 0
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        self._parse()

    # -- low-level cursor -------------------------------------------------------------------------

    def _fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self._where}: {what}; the file is truncated or corrupt")

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self._pos + n > self.file_size:
            raise self._fail(
                f"{what} at byte {self._pos} needs {n} bytes, past the end of the file ({self.file_size} bytes)"
            )

    def _unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return value

    def _string(self, what: str) -> str:
        start = self._pos
        n = self._unpack("<Q", f"length of {what}")
        if n > self.file_size - self._pos:
            raise self._fail(
                f"{what} at byte {start} claims {n} bytes, past the end of the file ({self.file_size} bytes)"
            )
        raw = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"{self._where}: {what} at byte {start} is not valid UTF-8; the file is corrupt") from None

    def _value_type(self, what: str) -> GGUFValueType:
        at = self._pos
        raw = self._unpack("<I", what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self._fail(f"{what} at byte {at} is {raw}, not a GGUF value type") from None

    def _value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            value = self._unpack(_SCALARS[vtype][0], what)
            return bool(value) if vtype == GGUFValueType.BOOL else value
        if vtype == GGUFValueType.STRING:
            return self._string(what)
        assert vtype == GGUFValueType.ARRAY
        if depth > 2:
            raise self._fail(f"{what}: arrays nested more than 3 deep")
        itype = self._value_type(f"element type of {what}")
        at = self._pos
        count = self._unpack("<Q", f"length of {what}")
        if count * _MIN_VALUE_BYTES[itype] > self.file_size - self._pos:
            raise self._fail(
                f"{what} at byte {at} claims {count} elements of type {itype.name}, more than the "
                f"{self.file_size - self._pos} bytes left in the file"
            )
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype][1])
            arr = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += count * dtype.itemsize
            return arr.astype(bool).tolist() if itype == GGUFValueType.BOOL else arr.tolist()
        return [self._value(itype, f"{what}[{i}]", depth + 1) for i in range(count)]

    # -- structure --------------------------------------------------------------------------------

    def _parse(self) -> None:
        magic = bytes(self._buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self._where}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        if self.file_size < HEADER_BYTES:
            raise self._fail(f"header needs {HEADER_BYTES} bytes but the file has {self.file_size}")
        self._pos = 4
        version = self._unpack("<I", "version")
        if version not in SUPPORTED_VERSIONS:
            if int.from_bytes(version.to_bytes(4, "little"), "big") in SUPPORTED_VERSIONS:
                raise GGUFError(f"{self._where}: big-endian GGUF files are not supported")
            raise GGUFError(
                f"{self._where}: GGUF version {version} is not supported (only versions 2 and 3); "
                "re-convert it with a current llama.cpp"
            )
        self.version = version
        n_tensors = self._unpack("<Q", "tensor count")
        n_kv = self._unpack("<Q", "kv count")
        left = self.file_size - self._pos
        if n_kv * _MIN_KV_BYTES > left:
            raise self._fail(f"kv count {n_kv} is implausible for a file of {self.file_size} bytes")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > left:
            raise self._fail(f"tensor count {n_tensors} is implausible for a file of {self.file_size} bytes")

        for i in range(n_kv):
            key = self._string(f"key of metadata entry {i}")
            vtype = self._value_type(f"value type of '{key}'")
            if key in self.metadata:
                raise self._fail(f"metadata key '{key}' appears twice")
            self.metadata[key] = self._value(vtype, f"value of '{key}'")

        alignment = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
            raise self._fail(f"general.alignment {alignment!r} is not a positive power of two")
        self.alignment = alignment

        infos = [self._tensor_info(i) for i in range(n_tensors)]
        header_end = self._pos
        self.data_start = -(-header_end // alignment) * alignment
        for name, ggml_type, shape, rel in infos:
            self.tensors[name] = self._locate(name, ggml_type, shape, rel)

    def _tensor_info(self, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int]:
        name = self._string(f"name of tensor {i}")
        n_dims = self._unpack("<I", f"dimension count of tensor '{name}'")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor '{name}' has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        self._need(8 * n_dims, f"dimensions of tensor '{name}'")
        dims = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
        self._pos += 8 * n_dims
        if any(d == 0 for d in dims) or int(np.prod(np.array(dims, dtype=object))) > self.file_size * 64:
            raise self._fail(f"tensor '{name}' has impossible dimensions {list(dims)}")
        at = self._pos
        raw_type = self._unpack("<I", f"type of tensor '{name}'")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFError(
                f"{self._where}: tensor '{name}' has ggml type {raw_type} (at byte {at}), which gguf-py does "
                "not know; the file is corrupt or newer than this gguf package"
            ) from None
        rel = self._unpack("<Q", f"data offset of tensor '{name}'")
        return name, ggml_type, tuple(int(d) for d in reversed(dims)), rel

    def _locate(self, name: str, ggml_type: GGMLQuantizationType, shape: tuple[int, ...], rel: int) -> GGUFTensor:
        if name in self.tensors:
            raise self._fail(f"tensor '{name}' appears twice")
        if ggml_type not in GGML_QUANT_SIZES:
            raise GGUFError(f"{self._where}: tensor '{name}' has type {ggml_type.name}, whose block size is unknown")
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        row = shape[-1]
        if row % block:
            raise self._fail(f"tensor '{name}' rows of {row} are not a multiple of {ggml_type.name}'s block of {block}")
        if rel % self.alignment:
            raise self._fail(f"tensor '{name}' data offset {rel} is not a multiple of the alignment {self.alignment}")
        row_bytes = row // block * block_bytes
        n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
        nbytes = n_rows * row_bytes
        start = self.data_start + rel
        end = start + nbytes
        if end > self.file_size:
            raise self._fail(
                f"tensor '{name}' data ends at byte {end}, past the end of the file ({self.file_size} bytes)"
            )
        view = self._mm[start:end].reshape(*shape[:-1], row_bytes)
        return GGUFTensor(name=name, ggml_type=ggml_type, shape=shape, offset=start, nbytes=nbytes, data=view)

    # -- convenience ------------------------------------------------------------------------------

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...]) -> Any:
        """A metadata value that must exist and have the given Python type (bool is not an int here)."""
        if key not in self.metadata:
            raise GGUFError(f"{self._where}: metadata key '{key}' is missing")
        value = self.metadata[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise GGUFError(
                f"{self._where}: metadata '{key}' is {type(value).__name__} {value!r:.60}, expected "
                f"{' or '.join(k.__name__ for k in kinds)}"
            )
        return value


def read_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; raises `GGUFError` with one line on any malformation."""
    return GGUFFile(path)
