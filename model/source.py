"""Where the runtime and the quantizers get weights from: anything that hands out one tensor by name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from qkiln.model.config import LlamaConfig

# Rows read or converted at a time by the chunked paths: 16 Mi float32 values (64 MiB).
ROW_BLOCK_FLOATS = 1 << 24


class TensorSource(Protocol):
    """A model's tensors by Hugging Face name, read one at a time (a checkpoint on disk, a dict in memory)."""

    config: LlamaConfig

    def names(self) -> list[str]: ...

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array or a read-only view; callers must not write to it)."""
        ...


class DictSource:
    """Tensors held in memory, e.g. a model made in a test or weights replaced after quantization."""

    def __init__(self, config: LlamaConfig, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]):
        self.config = config
        self._tensors = {k: np.asarray(v, dtype=np.float32) for k, v in dict(tensors).items()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        return self._tensors[name]


class LazyRows:
    """A 2-D tensor of a source that reads it from disk, read a block of rows at a time: what lets a weight
    larger than a decoder layer (an 8B model's 128256 x 4096 embedding or head: 2 GB in float32) be quantized
    or converted in row chunks, with memory at one chunk. `np.asarray(lazy)` reads it all (any consumer that
    is not chunk-aware still works); `lazy[r0:r1]` and `lazy[index_array]` read only those rows, float32."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(self, shape: tuple[int, int], read_rows: Callable[..., np.ndarray]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.size = self.shape[0] * self.shape[1]
        self._read = read_rows  # (r0, r1, out=None) -> (r1 - r0, cols) float32: `out`, or a fresh array

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, r0: int, r1: int) -> np.ndarray:
        r0, r1 = max(0, r0), min(self.shape[0], r1)
        return self._read(r0, r1) if r1 > r0 else np.zeros((0, self.shape[1]), np.float32)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1):
            start, stop, _ = key.indices(self.shape[0])
            return self.rows(start, stop)
        idx = np.asarray(key)
        if idx.dtype.kind in "iu" and idx.ndim == 1:  # a gather of rows (calibration tokens' embeddings)
            out = np.empty((len(idx), self.shape[1]), np.float32)
            for i, r in enumerate(idx):
                out[i] = self._read(int(r), int(r) + 1)[0]
            return out
        return np.asarray(self)[key]

    def blocks(self, max_floats: int | None = None) -> Iterator[np.ndarray]:
        """The rows in order, as float32 blocks of at most `max_floats` values (at least one row)."""
        step = block_rows(self.shape[1], max_floats)
        for r0 in range(0, self.shape[0], step):
            yield self.rows(r0, r0 + step)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._read(0, self.shape[0], np.empty(self.shape, np.float32))
        return out if dtype is None else out.astype(dtype, copy=False)


def block_rows(cols: int, max_floats: int | None = None) -> int:
    """Rows per block of a chunked path: at most `max_floats` values (ROW_BLOCK_FLOATS), at least one row."""
    return max(1, (max_floats or ROW_BLOCK_FLOATS) // max(1, cols))


def row_blocks(w: np.ndarray | LazyRows, max_floats: int | None = None) -> Iterator[np.ndarray]:
    """A 2-D array's (or LazyRows') rows in order, in blocks of at most `max_floats` values."""
    if isinstance(w, LazyRows):
        yield from w.blocks(max_floats)
        return
    step = block_rows(w.shape[1], max_floats)
    for r0 in range(0, w.shape[0], step):
        yield w[r0 : r0 + step]


def read_lazily(source: Any, name: str) -> np.ndarray | LazyRows:
    """`source.lazy(name)` where the source reads from disk (a checkpoint), else `source.tensor(name)`; either
    way `LazyRows` or a float32 array."""
    lazy = getattr(source, "lazy", None)
    w = lazy(name) if lazy is not None else source.tensor(name)
    return w if isinstance(w, LazyRows) else np.asarray(w, dtype=np.float32)
