"""FP8 grids: E4M3FN (NVIDIA; max 448, -0 exists, NaN 0x7F/0xFF) and E4M3FNUZ (AMD MI300; exponent
bias 8, max 240, no -0, no inf, NaN 0x80), with a per-tensor or per-output-channel float32 scale.

w = fp8(code) * scale, scale = amax / fmax (1.0 for an all-zero row/tensor, so no zero scale reaches a
runtime). The cast is ml_dtypes' (round to nearest even); ml_dtypes turns an overflow into NaN where
torch saturates, so x / scale is clamped to ±fmax first. ml_dtypes maps -0 to +0 for E4M3FNUZ, so a
finite input never yields 0x80 there.

Error bound (normal range): |w - ŵ| <= 2**-4 · |w| (3 mantissa bits, half an ulp), and at most half the
smallest subnormal step times the scale near zero.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from qkiln.quantize.scheme import Params, Scheme

FORMATS: dict[str, type] = {
    "e4m3fn": ml_dtypes.float8_e4m3fn,
    "e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
}


@dataclasses.dataclass(frozen=True)
class FP8Grid(Scheme):
    """FP8 `fmt` ("e4m3fn" | "e4m3fnuz"), per tensor (`tensor_scale`) or per output channel.

    params:
      scale  (rows, 1) float32 — per channel; per tensor the same value repeated on every row
             (a writer takes scale[0, 0]).
    codes (rows, cols) uint8 — the FP8 bit patterns.
    """

    fmt: str = "e4m3fn"
    tensor_scale: bool = False

    def __post_init__(self) -> None:
        assert self.fmt in FORMATS, self.fmt

    @property
    def per_tensor(self) -> bool:  # type: ignore[override]
        return self.tensor_scale

    @property
    def dtype(self) -> type:
        return FORMATS[self.fmt]

    @property
    def fmax(self) -> float:
        return float(ml_dtypes.finfo(self.dtype).max)

    @property
    def fit_cols(self) -> int:
        return 0

    @property
    def code_range(self) -> tuple[int, int]:
        return 0, 255

    def nan_codes(self) -> tuple[int, ...]:
        return (0x80,) if self.fmt == "e4m3fnuz" else (0x7F, 0xFF)

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        step = max(1, (1 << 20) // max(w.shape[1], 1))  # row chunks: no full float32 copy of `w`
        amax = np.concatenate(
            [
                np.abs(w[r0 : r0 + step].astype(np.float32)).max(axis=1, keepdims=True)
                for r0 in range(0, len(w), step)
            ]
        )  # (rows, 1)
        if self.tensor_scale:
            amax = np.full_like(amax, amax.max())
        scale = np.where(amax > 0, amax / np.float32(self.fmax), np.float32(1))
        return {"scale": scale.astype(np.float32)}

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        scale = params["scale"].astype(np.float32)
        return scale, np.zeros_like(scale)

    def values(self, codes: np.ndarray) -> np.ndarray:
        return codes.view(self.dtype).astype(np.float32)

    def encode_affine(self, w: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = np.where(scale != 0, (w - offset) / scale, np.float32(0))  # (rows, k)
        x = np.clip(x, -self.fmax, self.fmax).astype(np.float32)
        return x.astype(self.dtype).view(np.uint8)


def fp8_schemes() -> list[FP8Grid]:
    out = []
    for fmt in FORMATS:
        out.append(FP8Grid(f"fp8_{fmt}_pc", fmt=fmt, tensor_scale=False))
        out.append(FP8Grid(f"fp8_{fmt}_pt", fmt=fmt, tensor_scale=True))
    return out
