"""Integer grids for the GPTQ / compressed-tensors / ONNX MatMulNBits layouts: INT8 and INT4, per channel
or per group, symmetric or with an integer zero point.

Conventions (those of GPTQModel and compressed-tensors, so writers only repack):
- codes are unsigned, 0..2**bits - 1 (offset binary: INT8 value -128..127 is code 0..255);
- symmetric: scale = amax / ((2**bits - 1) / 2) (4 bits: amax / 7.5), zero point fixed at 2**(bits-1),
  w = (q - 2**(bits-1)) * scale — the extreme +amax lands half a step outside and clamps, as in both tools;
- asymmetric: the range [min(x, 0), max(x, 0)] spread over 2**bits - 1 steps, zero point
  round(-min / scale) in 0..2**bits - 1, w = (q - zero) * scale;
- scales are stored float16 (what the layouts hold); codes are chosen against the stored fp16 scale.

A group size that does not divide the row is refused (QuantizeError from `check_shape`): qkiln has no
partial last group; mixed-precision rules choose a fallback scheme for such tensors.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qkiln.kernels import gptq as c_loops
from qkiln.quantize.scheme import Params, UniformGrid, to_fp16

# Range shrink factors tried by the importance-weighted fit: 1, 0.99, ..., 0.81.
SHRINK = (1.0 - np.arange(20, dtype=np.float32) / 100).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class IntGrid(UniformGrid):
    """INT`bits` with `group` columns per scale (0 = per output channel).

    params:
      scale  (rows, n_groups) float16
      zero   (rows, n_groups) uint8 in 0..2**bits - 1 — only when not symmetric
    codes (rows, cols) uint8 in 0..2**bits - 1.
    """

    bits: int = 4  # type: ignore[misc]
    group: int = 0
    symmetric: bool = True

    @property
    def shift(self) -> int:  # type: ignore[override]
        return 1 << (self.bits - 1) if self.symmetric else 0

    @property
    def group_cols(self) -> int:
        return self.group

    @property
    def fit_cols(self) -> int:
        return self.group

    def _groups(self, w: np.ndarray) -> np.ndarray:
        rows, cols = w.shape
        g = self.group or cols
        return w.reshape(rows, cols // g, g)  # (rows, n_groups, g)

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        """Min/max params per group; with `importance` (cols,), the group's range is also shrunk by each
        of SHRINK and, per (row, group), the params with the least importance-weighted squared error
        are kept (llm-compressor's MSE observer grid, weighted like llama.cpp's imatrix)."""
        w = w.astype(np.float32, copy=False)
        if importance is not None:
            got = c_loops.int_fit(w.T, self.group or w.shape[1], self.bits, self.symmetric, importance, SHRINK)
            if got is not None and not got[2]:  # the same search in C, same bits
                scale, zero, _ = got
                return {"scale": scale} if zero is None else {"scale": scale, "zero": zero}
            # no C library, or a scale beyond float16: NumPy below (which says which)
        blocks = self._groups(w)  # (rows, n_groups, g)
        lo = np.minimum(blocks.min(axis=-1), 0)  # (rows, n_groups)
        hi = np.maximum(blocks.max(axis=-1), 0)
        if self.symmetric:
            hi = np.maximum(-lo, hi)  # amax
        best = self._range_params(lo, hi)
        if importance is None:
            return best
        imp = np.asarray(importance, np.float32).reshape(1, -1)  # (1, cols)
        g = self.group_index(w.shape[1])  # (cols,)

        def error(params: Params) -> np.ndarray:
            scale, offset = self.affine(params)  # (rows, n_groups)
            codes = self.encode_affine(w, scale[:, g], offset[:, g])  # (rows, cols)
            e = self._groups((self.decode(codes, params) - w) ** 2 * imp)  # (rows, n_groups, group)
            err = e[..., 0].copy()  # (rows, n_groups), summed in column order (the C kernel's order)
            for c in range(1, e.shape[-1]):
                err += e[..., c]
            return err

        best_err = error(best)
        for r in SHRINK[1:]:
            cand = self._range_params(lo * r, hi * r)
            err = error(cand)
            take = err < best_err  # (rows, n_groups)
            best_err = np.where(take, err, best_err)
            best = {k: np.where(take, cand[k], best[k]) for k in best}
        return best

    def _range_params(self, lo: np.ndarray, hi: np.ndarray) -> Params:
        """Params for ranges [lo, hi] (rows, n_groups), lo <= 0 <= hi; symmetric grids use hi as amax."""
        qmax = (1 << self.bits) - 1
        if self.symmetric:
            return {"scale": to_fp16(hi / np.float32(qmax / 2), f"{self.name}")}
        scale = to_fp16((hi - lo) / np.float32(qmax), f"{self.name}")
        s = scale.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            zero = np.where(s > 0, np.rint(-lo / s), 0)
        return {"scale": scale, "zero": np.clip(zero, 0, qmax).astype(np.uint8)}

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        scale = params["scale"].astype(np.float32)
        if self.symmetric:
            return scale, np.zeros_like(scale)
        return scale, -params["zero"].astype(np.float32) * scale

    def decode(self, codes: np.ndarray, params: Params) -> np.ndarray:
        # The layouts' arithmetic: (q - zero) * scale, one rounding; per group as a block (no gathers).
        q = self._groups(codes).astype(np.int16)  # (rows, n_groups, g)
        q -= params["zero"][:, :, None] if not self.symmetric else np.int16(self.shift)
        v = q.astype(np.float32)
        v *= params["scale"].astype(np.float32)[:, :, None]
        return v.reshape(codes.shape)


def int_schemes() -> list[IntGrid]:
    """The registered integer grids."""
    out = [IntGrid("int8", bits=8, group=0, symmetric=True)]
    for sym in (True, False):
        suffix = "" if sym else "_asym"
        for g in (32, 64, 128):
            out.append(IntGrid(f"int4_g{g}{suffix}", bits=4, group=g, symmetric=sym))
        out.append(IntGrid(f"int4_pc{suffix}", bits=4, group=0, symmetric=sym))
    return out
