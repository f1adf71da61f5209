"""A weight grid (`Scheme`): which values a quantized weight may take, and how its parameters are chosen.

Every grid qkiln knows is affine per group on a (possibly non-uniform) code book:

    w[r, c] = value(codes[r, c]) * scale[r, g] + offset[r, g]      g = c // group_cols

- `value` is the identity for integer grids (codes are unsigned, e.g. 0..15 for 4 bits) and the
  FP8 decoding for FP8 grids (codes are the FP8 bit patterns).
- `params` are the stored numbers (fp16 `d`, 6-bit sub-scales, zero points, ...), exactly as a
  format writer packs them; `affine(params)` derives (scale, offset) from them.

A quantizer (RTN, GPTQ, AWQ) first fixes `params` with `fit` — for a whole matrix, or for one
fit unit of columns at a time (GPTQ, on error-updated weights) — then picks codes on that grid with
`encode`. Writers only pack codes and params; nobody re-quantizes.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np

from qkiln.errors import QuantizeError

Params = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Scheme(abc.ABC):
    """A weight grid. Subclasses are frozen dataclasses registered by name in `quantize.registry`."""

    name: str

    # Columns that share one (scale, offset): 32 for Q4_0, 16/32 for K-quant sub-blocks, the group
    # size for INT4 g64, the whole row (0) for per-channel.
    group_cols: ClassVar[int] = 0

    @property
    @abc.abstractmethod
    def fit_cols(self) -> int:
        """Columns whose params are chosen together (256 for a K-quant super-block); 0 = whole row."""

    @abc.abstractmethod
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        """Choose params for `w` (rows, k·fit_cols) float32 by this grid's reference rule.

        `importance` (cols,) optionally weights the error per input column (llama.cpp's imatrix style).
        """

    @abc.abstractmethod
    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset), each (rows, n_groups) float32, from the stored params."""

    @abc.abstractmethod
    def encode(self, w: np.ndarray, params: Params) -> np.ndarray:
        """Codes (rows, cols) for `w` on the fixed grid `params` (round to nearest, clamped)."""

    @abc.abstractmethod
    def values(self, codes: np.ndarray) -> np.ndarray:
        """The code book: float32 value of each code (identity for integer grids)."""

    def decode(self, codes: np.ndarray, params: Params) -> np.ndarray:
        """Exact float32 weights (rows, cols) from codes and params."""
        scale, offset = self.affine(params)
        rows, cols = codes.shape
        g = self.group_index(cols)
        return self.values(codes) * scale[:, g] + offset[:, g]

    def group_index(self, cols: int) -> np.ndarray:
        """Group of each column, (cols,) int."""
        step = self.group_cols or cols
        return np.arange(cols) // step

    def check_shape(self, shape: tuple[int, ...], tensor: str = "weight") -> None:
        """Refuse a shape this grid cannot hold, with a message that says what fits."""
        if len(shape) != 2:
            raise QuantizeError(f"{tensor}: {self.name} quantizes 2-D weights, got shape {shape}")
        unit = self.fit_cols
        if unit and shape[1] % unit:
            raise QuantizeError(
                f"{tensor}: row length {shape[1]} is not a multiple of {self.name}'s block of {unit}; "
                f"choose a scheme whose group size divides {shape[1]}"
            )
