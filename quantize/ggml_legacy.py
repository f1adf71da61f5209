"""llama.cpp's legacy 32-weight block grids: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

The reference rules (ggml-quants.c `quantize_row_*_ref`, mirrored by gguf-py's `gguf.quants`) are
followed operation for operation in float32, so RTN codes and fp16 params are bit-identical to
`gguf.quants.quantize`:

- Q8_0: d = amax / 127, q = round-half-away(x / d) in -127..127, stored as code q + 128.
- Q4_0 / Q5_0: d = max / -8 (-16), max the signed value of largest magnitude (first on ties),
  code = min(15 (31), trunc(x / d + 8.5 (16.5))), w = d * (code - 8 (16)).
- Q4_1 / Q5_1: d = (max - min) / 15 (31), code = trunc((x - min) / d + 0.5), w = d * code + m.

The codes are chosen with the float32 d (then d is rounded to fp16), exactly as ggml does; the
fixed-grid `encode` used by GPTQ works from the stored fp16 d instead.

With `importance` (cols,) — llama.cpp's imatrix, the mean squared activation of each input column —
Q4_0/Q5_0/Q4_1/Q5_1 follow ggml's `quantize_row_q*_impl` instead: per-weight error weights
importance · sqrt(σ²_row + x²) and a weighted search for the block scale (`make_qx_quants`; with a
min, `make_qkx3_quants`), bit-identical to `llama-quantize --imatrix`. Q8_0 has no such path in ggml
and ignores it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.kquants import _make_qkx2, _make_qx, _seq_sum
from qkiln.quantize.scheme import Params, UniformGrid, to_fp16

BLOCK = 32


def _imatrix_weights(w: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """ggml's error weights for the imatrix path: qw · sqrt(σ² + x²), σ² = mean x² of the row.
    (rows, cols) -> (rows, cols / 32, 32) float32, σ² summed in ggml's order."""
    x = w.astype(np.float32, copy=False)
    rows, cols = x.shape
    if importance.shape != (cols,):
        raise QuantizeError(
            f"importance has shape {importance.shape}, expected ({cols},): one value per input column"
        )
    sigma2 = _seq_sum(np.ascontiguousarray(np.square(x).T)) / np.float32(cols)  # (rows,)
    weights = importance.astype(np.float32)[None, :] * np.sqrt(sigma2[:, None] + x * x)
    return weights.reshape(rows, cols // BLOCK, BLOCK)


def _blocks(w: np.ndarray) -> np.ndarray:
    rows, cols = w.shape
    return w.astype(np.float32, copy=False).reshape(rows, cols // BLOCK, BLOCK)  # (rows, nb, 32)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d)


def _round_away(x: np.ndarray) -> np.ndarray:
    """roundf(): half away from zero (ggml's Q8_0 rule), as gguf-py computes it."""
    a = np.abs(x)
    f = np.floor(a)
    return np.sign(x) * (f + np.floor(2 * (a - f)))


class _Legacy(UniformGrid):
    @property
    def group_cols(self) -> int:
        return BLOCK

    @property
    def fit_cols(self) -> int:
        return BLOCK

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        return self.quantize(w, importance)[1]


@dataclasses.dataclass(frozen=True)
class Q8_0(_Legacy):
    """params: d (rows, cols/32) float16.  codes (rows, cols) uint8 = int8 value + 128, in 1..255."""

    bits: ClassVar[int] = 8
    shift: ClassVar[int] = 128

    @property
    def code_range(self) -> tuple[int, int]:
        return 1, 255  # int8 -128 is not on Q8_0's grid; encode_affine clamps to this range

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, Params]:
        b = _blocks(w)
        d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)  # (rows, nb, 1) float32
        q = _round_away(b * _inverse(d))
        codes = (q + np.float32(128)).astype(np.uint8).reshape(w.shape)
        return codes, {"d": to_fp16(d[..., 0], self.name)}

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        d = params["d"].astype(np.float32)
        return d, np.zeros_like(d)


@dataclasses.dataclass(frozen=True)
class SymBlock(_Legacy):
    """Q4_0 (bits=4) / Q5_0 (bits=5).  params: d (rows, cols/32) float16.
    codes (rows, cols) uint8 in 0..2**bits - 1, w = d * (code - 2**(bits-1))."""

    bits: int = 4  # type: ignore[misc]

    @property
    def shift(self) -> int:  # type: ignore[override]
        return 1 << (self.bits - 1)

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, Params]:
        if importance is not None:
            qw = _imatrix_weights(w, importance).reshape(-1, BLOCK)
            scale, L = _make_qx(_blocks(w).reshape(-1, BLOCK), self.shift, qw)
            return L.reshape(w.shape), {"d": to_fp16(scale.reshape(w.shape[0], -1), self.name)}
        b = _blocks(w)
        imax = np.abs(b).argmax(axis=-1)[..., None]  # (rows, nb, 1)
        vmax = np.take_along_axis(b, imax, axis=-1)
        d = vmax / np.float32(-self.shift)  # (rows, nb, 1) float32
        q = np.trunc(b * _inverse(d) + np.float32(self.shift + 0.5), dtype=np.float32)
        codes = np.clip(q.astype(np.uint8), 0, (1 << self.bits) - 1).reshape(w.shape)
        return codes, {"d": to_fp16(d[..., 0], self.name)}

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        d = params["d"].astype(np.float32)
        return d, np.zeros_like(d)


@dataclasses.dataclass(frozen=True)
class MinBlock(_Legacy):
    """Q4_1 (bits=4) / Q5_1 (bits=5).  params: d, m (rows, cols/32) float16.
    codes (rows, cols) uint8 in 0..2**bits - 1, w = d * code + m."""

    bits: int = 4  # type: ignore[misc]
    shift: ClassVar[int] = 0

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, Params]:
        if importance is not None:
            qw = _imatrix_weights(w, importance).reshape(-1, BLOCK)
            nmax = (1 << self.bits) - 1
            scale, the_min, L = _make_qkx2(
                _blocks(w).reshape(-1, BLOCK), qw, nmax, -0.9, 0.05, 36
            )  # make_qkx3
            rows = w.shape[0]
            params = {
                "d": to_fp16(scale.reshape(rows, -1), self.name),
                "m": to_fp16(-the_min.reshape(rows, -1), self.name),
            }
            return L.reshape(w.shape), params
        b = _blocks(w)
        hi = b.max(axis=-1, keepdims=True)  # (rows, nb, 1)
        lo = b.min(axis=-1, keepdims=True)
        d = (hi - lo) / np.float32((1 << self.bits) - 1)
        q = np.trunc((b - lo) * _inverse(d) + np.float32(0.5), dtype=np.float32)
        codes = np.clip(q.astype(np.uint8), 0, (1 << self.bits) - 1).reshape(w.shape)
        return codes, {"d": to_fp16(d[..., 0], self.name), "m": to_fp16(lo[..., 0], self.name)}

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        return params["d"].astype(np.float32), params["m"].astype(np.float32)


def legacy_schemes() -> list[UniformGrid]:
    return [
        Q8_0("q8_0"),
        SymBlock("q4_0", bits=4),
        MinBlock("q4_1", bits=4),
        SymBlock("q5_0", bits=5),
        MinBlock("q5_1", bits=5),
    ]
