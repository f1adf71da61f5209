"""llama.cpp's K-quants on 256-weight super-blocks: Q4_K, Q5_K (8 sub-blocks of 32, 6-bit scales and
mins), Q6_K (16 sub-blocks of 16, int8 scales), Q2_K (16 of 16, 4-bit scales and mins) and Q3_K
(16 of 16, 6-bit signed scales).

The reference rules of ggml-quants.c (`quantize_row_q{2,3,4,5,6}_K_ref`: `make_qkx2_quants` per
sub-block — a weighted least-squares search over 1 + nstep candidate scales with a min — then
quantization of the sub-scales against the super-block maximum; `make_qx_quants` with x² weights
and 18 trial scales for Q6_K; `make_q3_quants`' per-weight refinement for Q3_K) are re-expressed on arrays of all sub-blocks at once, with the same
float32 operations in the same order (sums included), so RTN output is bit-identical to llama.cpp's
reference quantizer (tested against libggml through ctypes; gguf-py has no K-quant quantizer).
The price of exactness is about twice the passes of an algebraically rearranged search.

Error bound: codes are the nearest on the final grid (w within half a sub-block step d·sc of its
value) except where the 6-bit sub-scale/min quantization pushes a value past the grid's end.

`importance` (cols,) — an imatrix, the mean squared activation per input column — switches every
type to ggml's `quantize_row_q*_K_impl` path (weighted sub-block searches, sub-scales quantized by
`make_qp_quants` / `make_qx_quants`), bit-identical to `llama-quantize --imatrix`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.scheme import Params, UniformGrid, concat_rows, to_fp16

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
CACHE_ELEMS = 1 << 16


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """(n, B) -> (B,): Σ over axis 0 in index order — NumPy reduces an outer axis row by row, which is
    exactly the order of ggml's `for (i...) sum += ...` loops, so float32 sums round the same way.
    Only for a C-contiguous `a`: on a transposed view NumPy would sum pairwise along memory instead."""
    assert a.flags.c_contiguous
    return np.add.reduce(a, axis=0)


def _make_qkx2(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants on every sub-block at once: x, weights (B, n) -> (scale (B,), the_min (B,) >= 0,
    L (B, n) uint8).

    Hot loop. Arrays are transposed to (n, B) so every sum runs in ggml's order, and each product,
    sum and comparison is the same float32 operation as in ggml-quants.c, including the running min
    that an accepted trial feeds into the next one — so the result is bit-identical to llama.cpp's.
    Only the winning (inverse scale, min) is kept; L is rebuilt from it at the end with the same
    operations, so it equals the winning trial's levels.
    """
    f32 = np.float32
    xt = np.ascontiguousarray(x.T)  # (n, B)
    wt = np.ascontiguousarray(weights.T)  # (n, B)
    mn = np.minimum(xt.min(axis=0), f32(0))  # (B,) current min
    hi = xt.max(axis=0)
    sum_w = _seq_sum(wt)
    sum_x = _seq_sum(wt * xt)
    flat = hi == mn
    t = np.empty_like(xt)  # (n, B) levels of the current trial
    wl = np.empty_like(xt)
    tmp = np.empty_like(xt)

    def levels(iscale: np.ndarray, m: np.ndarray) -> None:
        np.subtract(xt, m, out=t)
        np.multiply(t, iscale, out=t)  # iscale·(x − min)
        np.rint(t, out=t)  # nearest_int: round half to even
        np.clip(t, f32(0), f32(nmax), out=t)

    def error(s: np.ndarray, m: np.ndarray) -> np.ndarray:
        np.multiply(t, s, out=tmp)
        np.add(tmp, m, out=tmp)
        np.subtract(tmp, xt, out=tmp)  # diff = s·L + min − x
        if use_mad:
            np.abs(tmp, out=tmp)
        else:
            np.multiply(tmp, tmp, out=tmp)
        np.multiply(wt, tmp, out=tmp)
        return _seq_sum(tmp)  # Σ w·diff² (Σ w·|diff| with use_mad)

    span0 = np.where(flat, f32(1), hi - mn)
    best_iscale = f32(nmax) / span0
    scale = f32(1) / best_iscale
    levels(best_iscale, mn)
    best = error(scale, mn)
    best_mn = mn  # the min the winning levels were computed against
    for step in range(nstep + 1):
        span = hi - mn
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(span != 0, span, f32(1))
        levels(iscale, mn)
        np.multiply(wt, t, out=wl)
        sum_l = _seq_sum(wl)
        np.multiply(wl, t, out=tmp)
        sum_l2 = _seq_sum(tmp)
        np.multiply(wl, xt, out=tmp)
        sum_xl = _seq_sum(tmp)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = (D > 0) & ~flat
        with np.errstate(divide="ignore", invalid="ignore"):
            Ds = np.where(ok, D, f32(1))
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
            pos = this_min > 0
            this_min = np.where(pos, f32(0), this_min)
            this_scale = np.where(pos, sum_xl / np.where(sum_l2 != 0, sum_l2, f32(1)), this_scale)
        err = error(this_scale, this_min)
        take = ok & (err < best)
        best = np.where(take, err, best)
        best_iscale = np.where(take, iscale, best_iscale)
        best_mn = np.where(take, mn, best_mn)
        scale = np.where(take, this_scale, scale)
        mn = np.where(take, this_min, mn)
    levels(best_iscale, best_mn)
    L = np.where(flat, f32(0), t).T
    scale = np.where(flat, f32(0), scale)
    return scale.astype(f32), (-mn).astype(f32), L.astype(np.uint8)


def _make_qx(x: np.ndarray, nmax: int, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(rmse_type=1) on every sub-block at once: x (B, n) -> (scale (B,), L (B, n) uint8 =
    l + nmax), error weights x² or `weights` (B, n) (ggml's `quant_weights`). Same float32 operations
    and sum order as ggml (see _make_qkx2); hot loop."""
    f32 = np.float32
    imax = np.abs(x).argmax(axis=1)[:, None]
    vmax = np.take_along_axis(x, imax, axis=1)[:, 0]  # (B,) signed value of largest magnitude (first)
    zero = np.abs(vmax) < GROUP_MAX_EPS
    vmax = np.where(zero, f32(1), vmax)
    xt = np.ascontiguousarray(x.T)  # (n, B)
    w = xt * xt if weights is None else np.ascontiguousarray(weights.T)
    wx = w * xt
    t = np.empty_like(xt)
    tmp = np.empty_like(xt)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        np.multiply(xt, iscale, out=t)
        np.rint(t, out=t)
        np.clip(t, -nmax, nmax - 1, out=t)
        np.multiply(wx, t, out=tmp)
        sumlx = _seq_sum(tmp)  # Σ (w·x)·l
        np.multiply(w, t, out=tmp)
        np.multiply(tmp, t, out=tmp)
        return sumlx, _seq_sum(tmp)  # Σ (w·l)·l

    best_iscale = f32(-nmax) / vmax
    sumlx, suml2 = trial(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        slx, sl2 = trial(iscale)
        take = (sl2 > 0) & (slx * slx > best * sl2)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = slx / np.where(sl2 > 0, sl2, f32(1))
        best_iscale = np.where(take, iscale, best_iscale)
        scale = np.where(take, s, scale)
        best = np.where(take, s * slx, best)
    trial(best_iscale)
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, f32(0), t + f32(nmax)).T
    return scale.astype(f32), L.astype(np.uint8)


def _make_qp(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants on every row at once: non-negative x (B, n) with weights qw (B, n) -> (scale (B,),
    L (B, n) uint8 in 0..nmax): ggml's imatrix-path quantizer of K-quant sub-scales (9 trial scales,
    then per-element refinement as in _make_q3)."""
    f32 = np.float32
    xt = np.ascontiguousarray(x.T)  # (n, B)
    wt = np.ascontiguousarray(qw.T)
    vmax = np.maximum(xt.max(axis=0), f32(0))  # (B,)
    zero = vmax < GROUP_MAX_EPS
    vmax = np.where(zero, f32(1), vmax)

    def mse(iscale: np.ndarray, clamp: bool) -> np.ndarray:
        lv = np.rint(xt * iscale)
        if clamp:
            lv = np.minimum(lv, f32(nmax))
        diff = xt - (f32(1) / iscale) * lv
        return _seq_sum(wt * diff * diff)

    iscale = f32(nmax) / vmax
    best = mse(iscale, clamp=False)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = (f32(0.1) * f32(step) + f32(nmax)) / vmax
        err = mse(trial, clamp=True)
        take = err < best
        best = np.where(take, err, best)
        iscale = np.where(take, trial, iscale)
    L = np.minimum(np.rint(xt * iscale), f32(nmax))  # (n, B)
    wx = wt * xt
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum(wt * L * L)
    for _ in range(5):  # ggml stops once a pass changes nothing; later passes would change nothing
        for i in range(xt.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - wt[i] * li * li
            ok = (slx > 0) & (sl2 > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.minimum(np.rint(xt[i] * sl2 / np.where(ok, slx, f32(1))), f32(nmax))
            slx2 = slx + wx[i] * new
            sl22 = sl2 + wt[i] * new * new
            take = ok & (new != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, f32(0), L).T
    return scale.astype(f32), np.clip(L, 0, 255).astype(np.uint8)


def _imatrix_weights(
    x: np.ndarray, importance: np.ndarray, rows: int, sub: int, sigma_scale: float
) -> np.ndarray:
    """ggml's K-quant imatrix error weights qw · sqrt(σ² + x²), σ² = sigma_scale · Σx² / 256 per
    super-block (summed in ggml's order). x (rows·cols/sub, sub) sub-blocks -> same shape."""
    f32 = np.float32
    cols = x.size // rows
    if importance.shape != (cols,):
        raise QuantizeError(
            f"importance has shape {importance.shape}, expected ({cols},): one value per input column"
        )
    sb = x.reshape(-1, QK_K)  # (S, 256) super-blocks
    sum_x2 = _seq_sum(np.ascontiguousarray(np.square(sb).T))  # (S,)
    sigma2 = f32(sigma_scale) * sum_x2 / f32(QK_K)
    qw = np.broadcast_to(importance.astype(f32).reshape(1, cols // QK_K, QK_K), (rows, cols // QK_K, QK_K))
    weights = qw.reshape(-1, QK_K) * np.sqrt(sigma2[:, None] + sb * sb)
    return weights.reshape(-1, sub)


class _KQuant(UniformGrid):
    @property
    def fit_cols(self) -> int:
        return QK_K

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> tuple[np.ndarray, Params]:
        # The search makes ~20 passes over its arrays: keep them cache-sized (64K weights per piece
        # runs about twice as fast as 1M here).
        step = max(1, CACHE_ELEMS // max(w.shape[1], 1))
        if w.shape[0] <= step:
            return self._quantize(w, importance)
        parts = [self._quantize(w[r0 : r0 + step], importance) for r0 in range(0, w.shape[0], step)]
        return np.concatenate([c for c, _ in parts]), concat_rows([p for _, p in parts])

    def _quantize(self, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, Params]:
        raise NotImplementedError

    def fit(self, w: np.ndarray, importance: np.ndarray | None = None) -> Params:
        return self.quantize(w, importance)[1]

    def affine(self, params: Params) -> tuple[np.ndarray, np.ndarray]:
        """Per sub-block: scale d·sc_j, and offset −dmin·m_j for the types with mins (else 0)."""
        f32 = np.float32
        per = QK_K // self.group_cols  # sub-blocks per super-block
        scale = np.repeat(params["d"].astype(f32), per, axis=1) * params["scales"].astype(f32)  # (rows, n_sub)
        if "dmin" not in params:
            return scale, np.zeros_like(scale)
        return scale, -(np.repeat(params["dmin"].astype(f32), per, axis=1) * params["mins"].astype(f32))


@dataclasses.dataclass(frozen=True)
class QKMin(_KQuant):
    """Q4_K (bits=4) / Q5_K (bits=5): w = d·sc_j·q − dmin·m_j on sub-block j of 32.

    params:
      d, dmin  (rows, cols/256) float16 — super-block scale of the sub-scales / sub-mins
      scales   (rows, cols/32) uint8 in 0..63 — sub-block scale sc_j
      mins     (rows, cols/32) uint8 in 0..63 — sub-block min m_j
    codes (rows, cols) uint8 in 0..2**bits - 1.
    """

    bits: int = 4  # type: ignore[misc]
    shift: ClassVar[int] = 0

    @property
    def group_cols(self) -> int:
        return 32

    def _quantize(self, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, Params]:
        f32 = np.float32
        rows, cols = w.shape
        nsb = cols // QK_K
        nmax = (1 << self.bits) - 1
        x = w.astype(f32, copy=False).reshape(rows * nsb * 8, 32)  # (B, 32) sub-blocks
        if importance is None:
            with np.errstate(
                over="ignore", invalid="ignore"
            ):  # |x| > 1.8e19 overflows x²; to_fp16 reports it
                av_x = np.sqrt(_seq_sum(np.ascontiguousarray(np.square(x).T))[:, None] / f32(32))
                weights = av_x + np.abs(x)  # (B, 32)
                rmin, nstep = (-1.0, 20) if self.bits == 4 else (-0.5, 15)
                sc, mn, L = _make_qkx2(x, weights, nmax, rmin, 0.1, nstep)
            sc = sc.reshape(rows * nsb, 8)
            mn = mn.reshape(rows * nsb, 8)
            max_scale = np.maximum(sc.max(axis=1), f32(0))  # (S,)
            max_min = np.maximum(mn.max(axis=1), f32(0))
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
                inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
            ls = np.clip(np.rint(inv_scale[:, None] * sc), 0, 63).astype(np.uint8)  # (S, 8)
            lm = np.clip(np.rint(inv_min[:, None] * mn), 0, 63).astype(np.uint8)
            d_block, m_block = max_scale / f32(63), max_min / f32(63)
        else:  # ggml's quantize_row_q{4,5}_K_impl
            with np.errstate(over="ignore", invalid="ignore"):
                weights = _imatrix_weights(x, importance, rows, 32, 2.0)  # (B, 32)
                sw = _seq_sum(np.ascontiguousarray(weights.T)).reshape(-1, 8)  # (S, 8)
                sc, mn, L = _make_qkx2(x, weights, nmax, -0.9, 0.05, 36)  # make_qkx3_quants
                d_block, ls = _make_qp(sc.reshape(-1, 8), 63, sw)
                m_block, lm = _make_qp(mn.reshape(-1, 8), 63, sw)
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
        return _codes_with_mins(self.name, x, d_block, m_block, ls, lm, L, nmax, (rows, cols))


@dataclasses.dataclass(frozen=True)
class Q6K(_KQuant):
    """Q6_K: w = d·sc_j·(q − 32) on sub-block j of 16.

    params:
      d       (rows, cols/256) float16
      scales  (rows, cols/16) int8 — sub-block scale sc_j
    codes (rows, cols) uint8 in 0..63.
    """

    bits: ClassVar[int] = 6
    shift: ClassVar[int] = 32

    @property
    def group_cols(self) -> int:
        return 16

    def _quantize(self, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, Params]:
        f32 = np.float32
        rows, cols = w.shape
        nsb = cols // QK_K
        x = w.astype(f32, copy=False).reshape(rows * nsb * 16, 16)  # (B, 16) sub-blocks
        qw = None
        if importance is not None:  # ggml's quantize_row_q6_K_impl weighs the search by the imatrix alone
            if importance.shape != (cols,):
                raise QuantizeError(f"importance has shape {importance.shape}, expected ({cols},)")
            qw = np.broadcast_to(importance.astype(f32).reshape(1, -1, 16), (rows, cols // 16, 16)).reshape(
                -1, 16
            )
        with np.errstate(over="ignore", invalid="ignore"):  # |x| > 1.8e19 overflows x²; to_fp16 reports it
            sc, L = _make_qx(x, 32, qw)
        sc = sc.reshape(rows * nsb, 16)  # (S, 16)
        imax = np.abs(sc).argmax(axis=1)[:, None]
        max_scale = np.take_along_axis(sc, imax, axis=1)[:, 0]  # (S,) signed
        empty = np.abs(max_scale) < GROUP_MAX_EPS
        safe = np.where(empty, f32(1), max_scale)
        iscale = f32(-128) / safe
        d = to_fp16(np.where(empty, f32(0), f32(1) / iscale), self.name)
        ls = np.clip(np.rint(iscale[:, None] * sc), -128, 127)
        ls = np.where(empty[:, None], f32(0), ls).astype(np.int8)  # (S, 16)
        dj = (d.astype(f32)[:, None] * ls.astype(f32)).reshape(-1, 1)  # (B, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint(x / np.where(dj != 0, dj, f32(1))), -32, 31) + f32(32)
        codes = np.where(dj != 0, q.astype(np.uint8), L)
        codes = np.where(np.repeat(empty, 16)[:, None], np.uint8(0), codes).reshape(rows, cols)
        return codes, {"d": d.reshape(rows, nsb), "scales": ls.reshape(rows, nsb * 16)}


def _make_q3(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(do_rmse=true) on every sub-block at once: x (B, n) -> (scale (B,), L (B, n) uint8 =
    l + nmax). ggml refines the levels one weight at a time (each accepted change updates the running
    sums the next weight sees), so the loop runs over the n weights, vectorized over blocks."""
    f32 = np.float32
    imax = np.abs(x).argmax(axis=1)[:, None]
    vmax = np.take_along_axis(x, imax, axis=1)[:, 0]  # (B,)
    zero = np.abs(vmax) < GROUP_MAX_EPS
    iscale = f32(-nmax) / np.where(zero, f32(1), vmax)
    xt = np.ascontiguousarray(x.T)  # (n, B)
    w = xt * xt
    wx = w * xt
    L = np.clip(np.rint(xt * iscale), -nmax, nmax - 1)  # (n, B) float levels
    sumlx = _seq_sum(wx * L)
    suml2 = _seq_sum(w * L * L)
    for _ in range(5):  # ggml stops early once a pass changes nothing; later passes then change nothing
        for i in range(xt.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(np.rint(xt[i] * sl2 / np.where(slx > 0, slx, f32(1))), -nmax, nmax - 1)
            slx2 = slx + wx[i] * new
            sl22 = sl2 + w[i] * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0))
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero, f32(0), L + f32(nmax)).T
    return scale.astype(f32), L.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Q2K(_KQuant):
    """Q2_K: w = d·sc_j·q − dmin·m_j on sub-block j of 16.

    params:
      d, dmin  (rows, cols/256) float16
      scales   (rows, cols/16) uint8 in 0..15 — sub-block scale sc_j
      mins     (rows, cols/16) uint8 in 0..15 — sub-block min m_j
    codes (rows, cols) uint8 in 0..3.
    """

    bits: ClassVar[int] = 2
    shift: ClassVar[int] = 0

    @property
    def group_cols(self) -> int:
        return 16

    def _quantize(self, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, Params]:
        f32 = np.float32
        rows, cols = w.shape
        nsb = cols // QK_K
        x = w.astype(f32, copy=False).reshape(rows * nsb * 16, 16)  # (B, 16) sub-blocks
        if importance is None:
            with np.errstate(over="ignore", invalid="ignore"):
                sc, mn, L = _make_qkx2(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
            sc, mn = sc.reshape(-1, 16), mn.reshape(-1, 16)  # (S, 16)
            max_scale = np.maximum(sc.max(axis=1), f32(0))
            max_min = np.maximum(mn.max(axis=1), f32(0))
            with np.errstate(divide="ignore"):
                inv_scale = np.where(max_scale > 0, f32(15) / max_scale, f32(0))  # (S,)
                inv_min = np.where(max_min > 0, f32(15) / max_min, f32(0))
            ls = np.clip(np.rint(inv_scale[:, None] * sc), 0, 15).astype(np.uint8)
            lm = np.clip(np.rint(inv_min[:, None] * mn), 0, 15).astype(np.uint8)
            d_block = np.where(max_scale > 0, max_scale / f32(15), f32(0))
            m_block = np.where(max_min > 0, max_min / f32(15), f32(0))
        else:  # ggml's quantize_row_q2_K_impl
            with np.errstate(over="ignore", invalid="ignore"):
                weights = _imatrix_weights(x, importance, rows, 16, 1.0)  # (B, 16)
                sw = _seq_sum(np.ascontiguousarray(weights.T)).reshape(-1, 16)  # (S, 16)
                sc, mn, L = _make_qkx2(x, weights, 3, -0.9, 0.05, 36)  # make_qkx3_quants
                d_block, ls = _make_qp(sc.reshape(-1, 16), 15, sw)
                m_block, lm = _make_qp(mn.reshape(-1, 16), 15, sw)
        return _codes_with_mins(self.name, x, d_block, m_block, ls, lm, L, 3, (rows, cols))


@dataclasses.dataclass(frozen=True)
class Q3K(_KQuant):
    """Q3_K: w = d·sc_j·(q − 4) on sub-block j of 16.

    params:
      d       (rows, cols/256) float16
      scales  (rows, cols/16) int8 in -32..31 — sub-block scale sc_j (stored 6-bit as sc_j + 32)
    codes (rows, cols) uint8 in 0..7.
    """

    bits: ClassVar[int] = 3
    shift: ClassVar[int] = 4

    @property
    def group_cols(self) -> int:
        return 16

    def _quantize(self, w: np.ndarray, importance: np.ndarray | None) -> tuple[np.ndarray, Params]:
        f32 = np.float32
        rows, cols = w.shape
        nsb = cols // QK_K
        x = w.astype(f32, copy=False).reshape(rows * nsb * 16, 16)  # (B, 16) sub-blocks
        if importance is None:
            with np.errstate(over="ignore", invalid="ignore"):
                sc, L = _make_q3(x, 4)
            sc = sc.reshape(-1, 16)  # (S, 16)
            imax = np.abs(sc).argmax(axis=1)[:, None]
            max_scale = np.take_along_axis(sc, imax, axis=1)[:, 0]  # (S,) signed
            empty = max_scale == 0
            iscale = f32(-32) / np.where(empty, f32(1), max_scale)
            d = to_fp16(np.where(empty, f32(0), f32(1) / iscale), self.name)
            ls = np.clip(np.rint(iscale[:, None] * sc), -32, 31)
            ls = np.where(empty[:, None], f32(-32), ls).astype(
                np.int8
            )  # (S, 16); a zero block stores 6-bit 0
        else:  # ggml's quantize_row_q3_K_impl
            with np.errstate(over="ignore", invalid="ignore"):
                weights = _imatrix_weights(x, importance, rows, 16, 2.0)  # (B, 16)
                sw = _seq_sum(np.ascontiguousarray(weights.T)).reshape(-1, 16)  # (S, 16)
                sc, L = _make_qx(x, 4, weights)
                d_block, l6 = _make_qx(sc.reshape(-1, 16), 32, sw)
            d = to_fp16(d_block, self.name)
            ls = (l6.astype(np.int16) - 32).astype(np.int8)
        dj = (d.astype(f32)[:, None] * ls.astype(f32)).reshape(-1, 1)  # (B, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.clip(np.rint(x / np.where(dj != 0, dj, f32(1))), -4, 3) + f32(4)
        codes = np.where(dj != 0, q.astype(np.uint8), L).reshape(rows, cols)
        return codes, {"d": d.reshape(rows, nsb), "scales": ls.reshape(rows, nsb * 16)}


def _codes_with_mins(
    name: str,
    x: np.ndarray,
    d_block: np.ndarray,
    m_block: np.ndarray,
    ls: np.ndarray,
    lm: np.ndarray,
    L: np.ndarray,
    nmax: int,
    shape: tuple[int, int],
) -> tuple[np.ndarray, Params]:
    """The last step of Q2_K/Q4_K/Q5_K: fp16 super-block d/dmin, then each weight's code on the final grid.

    x (B, sub) sub-blocks; d_block, m_block (S,) super-block scales; ls, lm (S, n_sub) quantized sub-block
    scales and mins; L (B, sub) the search's codes, kept where a sub-block's scale is zero.
    """
    f32 = np.float32
    rows, cols = shape
    nsb = cols // QK_K
    d = to_fp16(d_block, name)
    dmin = to_fp16(m_block, name)
    dj = (d.astype(f32)[:, None] * ls.astype(f32)).reshape(-1, 1)  # (B, 1)
    mj = (dmin.astype(f32)[:, None] * lm.astype(f32)).reshape(-1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((x + mj) / np.where(dj != 0, dj, f32(1))), 0, nmax).astype(np.uint8)
    codes = np.where(dj != 0, q, L).reshape(rows, cols)
    n_sub = ls.shape[1]
    params = {
        "d": d.reshape(rows, nsb),
        "dmin": dmin.reshape(rows, nsb),
        "scales": ls.reshape(rows, nsb * n_sub),
        "mins": lm.reshape(rows, nsb * n_sub),
    }
    return codes, params


def kquant_schemes() -> list[UniformGrid]:
    return [Q2K("q2_k"), Q3K("q3_k"), QKMin("q4_k", bits=4), QKMin("q5_k", bits=5), Q6K("q6_k")]
