"""A weight grid (`Scheme`): which values a quantized weight may take, and how its parameters are chosen.

Every grid qkiln knows is affine per group on a (possibly non-uniform) code book:

    w[r, c] = value(codes[r, c]) * scale[r, g] + offset[r, g]      g = c // group_cols

- `value` is the code book: `code - shift` for integer grids (codes are unsigned, e.g. 0..15 for 4
  bits; Q4_0's shift is 8, Q4_1's is 0) and the FP8 decoding for FP8 grids (codes are the bit patterns).
- `params` are the stored numbers (fp16 `d`, 6-bit sub-scales, zero points, ...), exactly as a
  format writer packs them; `affine(params)` derives (scale, offset) from them.

A quantizer (RTN, GPTQ, AWQ) first fixes `params` with `fit` — for a whole matrix, or for one
fit unit of columns at a time (GPTQ, on error-updated weights) — then picks codes on that grid with
`encode` / `encode_affine`. Writers only pack codes and params; nobody re-quantizes.

`quantize(w)` = fit + encode by the grid's *reference* rule. For llama.cpp's block types that rule
chooses codes with the unrounded float32 scale, as ggml does, so RTN is bit-identical to
`gguf.quants`; `encode` (fixed grid, used by GPTQ) always works from the stored params.

`decode` is the format's own arithmetic (e.g. `(q - zero) * scale` for zero-point INT4, `d*q - dm`
for K-quants), so it is exactly what a runtime computes; `affine` is the algorithms' view of the
same grid and agrees with `decode` to float32 rounding.

Partial groups: qkiln refuses a row whose length is not a multiple of the scheme's fit unit
(`check_shape` raises QuantizeError). Mixed-precision rules (`quantize.rules`) pick a fallback scheme
per tensor instead, as llama.cpp does.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import ClassVar

import numpy as np

from qkiln.errors import QuantizeError

Params = dict[str, np.ndarray]

FP16_MAX = 65504.0


@dataclasses.dataclass(frozen=True)
class Scheme(abc.ABC):
    """A weight grid. Subclasses are frozen dataclasses registered by name in `quantize.registry`."""

    name: str

    # True when params depend on the whole matrix (FP8 per-tensor scale): RTN fits once, encodes in chunks.
    per_tensor: ClassVar[bool] = False

    @property
    def group_cols(self) -> int:
        """Columns that share one (scale, offset): 32 for Q4_0, 16/32 for K-quant sub-blocks, the group
        size for INT4 g64; 0 = the whole row (per channel)."""
        return 0

    @property
    @abc.abstractmethod
    def fit_cols(self) -> int:
        """Columns whose params are chosen together (256 for a K-quant super-block); 0 = whole row."""

    @property
    @abc.abstractmethod
    def code_range(self) -> tuple[int, int]:
        """Smallest and largest valid code (inclusive); FP8 grids also exclude their NaN patterns."""

    @abc.abstractmethod
    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        """Choose params for `w` (rows, k·fit_cols) float32 by this grid's reference rule.

        `importance` (cols,) optionally weights the error per input column (llama.cpp's imatrix style);
        schemes whose reference rule has no weights ignore it.
        """

    @abc.abstractmethod
    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset), each (rows, n_groups) float32, from the stored params."""

    @abc.abstractmethod
    def values(self, codes: np.ndarray) -> np.ndarray:
        """The code book: float32 value of each code (same shape as `codes`)."""

    @abc.abstractmethod
    def encode_affine(self, w: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """Codes uint8 nearest to `w` (any shape; `encode` passes (rows, n_groups, group)) given per-weight
        `scale`/`offset` (broadcastable to w): the code whose value is nearest (w - offset) / scale, clamped to
        the grid, element by element. A zero scale gives the code of value 0 (any code decodes to `offset` then)."""

    def encode(self, w: np.ndarray, params: Params) -> np.ndarray:
        """Codes (rows, cols) for `w` on the fixed grid `params` (round to nearest, clamped)."""
        scale, offset = self.affine(params)  # (rows, n_groups)
        rows, cols = w.shape
        n = scale.shape[1]
        assert n == self.n_groups(cols), (n, cols, self.name)
        # per group as a block, the params broadcast: the same rule per weight as gathering them to (rows,
        # cols), which made RTN's encode ~5x slower (AWQ's scale search encodes every candidate)
        codes = self.encode_affine(w.reshape(rows, n, cols // n), scale[:, :, None], offset[:, :, None])
        return codes.reshape(rows, cols)

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, Params]:
        """(codes, params) for `w` (rows, k·fit_cols) by the reference rule (RTN)."""
        params = self.fit(w, importance)
        return self.encode(w, params), params

    def decode(self, codes: np.ndarray, params: Params) -> np.ndarray:
        """Exact float32 weights (rows, cols) from codes and params."""
        scale, offset = self.affine(params)  # (rows, n_groups)
        rows, cols = codes.shape
        n_groups = scale.shape[1]
        v = np.array(self.values(codes), dtype=np.float32).reshape(rows, n_groups, cols // n_groups)
        v *= scale[:, :, None]  # the same v * scale + offset as per weight, without (rows, cols) gathers
        v += offset[:, :, None]
        return v.reshape(rows, cols)

    def group_index(self, cols: int) -> np.ndarray:
        """Group of each column, (cols,) int."""
        step = self.group_cols or cols
        return np.arange(cols) // step

    def n_groups(self, cols: int) -> int:
        return cols // self.group_cols if self.group_cols else 1

    def check_shape(self, shape: tuple[int, ...], tensor: str = "weight") -> None:
        """Refuse a shape this grid cannot hold, with a message that says what fits."""
        if len(shape) != 2:
            raise QuantizeError(f"{tensor}: {self.name} quantizes 2-D weights, got shape {tuple(shape)}")
        unit = self.fit_cols
        if unit and shape[1] % unit:
            raise QuantizeError(
                f"{tensor}: row length {shape[1]} is not a multiple of {self.name}'s block of {unit} "
                f"(qkiln refuses partial groups); choose a scheme whose group size divides {shape[1]} "
                f"or a rule preset that falls back per tensor"
            )


class UniformGrid(Scheme):
    """Integer code book `value(q) = q - shift`, q in 0..2**bits - 1 (shared by INT and ggml grids)."""

    bits: ClassVar[int] = 4
    shift: ClassVar[int] = 0

    @property
    def code_range(self) -> tuple[int, int]:
        return 0, (1 << self.bits) - 1

    def values(self, codes: np.ndarray) -> np.ndarray:
        return codes.astype(np.float32) - np.float32(self.shift)

    def encode_affine(self, w: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        # Rounding rule: half up, floor(x + 0.5), then clamp to the grid.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = np.where(scale != 0, (w - offset) / scale, np.float32(0))  # (rows, k)
        q = np.floor(x + np.float32(0.5)) + np.float32(self.shift)
        return np.clip(q, *self.code_range).astype(np.uint8)


def to_fp16(x: np.ndarray, what: str) -> np.ndarray:
    """float32 → float16 for a stored scale; a value beyond fp16's range is a user-facing error."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.isfinite(h).all():
        finite = np.isfinite(x)
        worst = f"of {float(np.abs(x).max()):.3g}" if finite.all() else "that overflows float32"
        raise QuantizeError(
            f"{what} needs a scale {worst}, beyond float16's {FP16_MAX:g}; the weights are out of range "
            f"for this scheme — use an FP8 or float scheme, or fix the checkpoint"
        )
    return h


def slice_rows(params: Params, r0: int, r1: int) -> Params:
    """Params of rows r0:r1 (every param has leading dim rows)."""
    return {k: v[r0:r1] for k, v in params.items()}


def concat_cols(parts: list[Params]) -> Params:
    """Join params fitted on consecutive fit units of columns (GPTQ fits one unit at a time)."""
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def concat_rows(parts: list[Params]) -> Params:
    """Join params fitted on consecutive row chunks (RTN bounds memory by chunking rows)."""
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
