"""GPTQ (Frantar et al., 2022): choose codes column by column on a FIXED grid, feeding each column's
rounding error back into the columns not yet quantized, weighted by the inverse Hessian.

Why a fixed grid: a format (Q4_0, Q4_K, INT4 g64, FP8) stores its own params (fp16 `d`, 6-bit
sub-scales, zero points); if GPTQ chose scales on its own the result would have to be re-quantized
to land in the file, undoing the error feedback. Here params come from `scheme.fit` — on the whole
original matrix (`grid="original"`), or per fit unit on the error-updated weights at the moment the
scan first reaches that unit (`grid="updated"`, the reference GPTQ's behaviour with groups) — and
every column's codes come from `scheme.encode_affine` on those params. So
`scheme.encode(qt.dequantize(), qt.params) == qt.codes`: the result IS a tensor of the target format.

Algorithm (one weight matrix, W (out, in), H = 2XᵀX/n (in, in)):
1. dead inputs (H_ii == 0, never active in calibration): H_ii := 1, so they take their RTN code and
   push no error anywhere (their row/column of H is zero). The reference zeroes such weights; we keep
   them, which is the same on calibration data and safer on unseen inputs.
2. act-order (optional): scan columns by descending H_ii — large-activation columns first, while
   many columns are still free to absorb their error. Groups stay in the format's column order; a
   group's params are fitted when the scan first touches any of its columns.
3. dampening: H += damp · mean(diag H) · I; U = upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU). If the
   factorization fails, damp is multiplied by 10 and retried (logged).
4. lazy blocks of `block_size` columns: inside a block each column's error e = (w - q) / U_jj updates
   the rest of the block (rank-1), and at the block's end one matmul pushes the block's errors onto all
   later columns.

Working layout is transposed (in, out) so a column of W is a contiguous row; float32 like the reference.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.scheme import Params, Scheme
from qkiln.quantize.tensor import QuantizedTensor

log = logging.getLogger(__name__)

GridMode = Literal["original", "updated"]
MAX_DAMP_RETRIES = 6


def check_finite(w: np.ndarray, name: str) -> None:
    """A NaN or Inf in a weight makes every algorithm's output meaningless: say which tensor."""
    if not np.isfinite(w).all():
        bad = int(np.size(w) - np.isfinite(w).sum())
        raise QuantizeError(f"{name or 'weight'}: {bad} NaN/Inf value(s) in the weight; fix the checkpoint")


def inverse_hessian_cholesky(h: np.ndarray, damp: float, name: str = "") -> tuple[np.ndarray, float]:
    """Upper U with UᵀU = (H + λI)⁻¹, λ = damp·mean(diag H); returns (U (in, in) float64, damp used).

    Retries with 10x the damping when H + λI is not numerically positive definite.
    """
    n = h.shape[0]
    mean_diag = float(np.mean(np.diag(h)))
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    d = damp
    for attempt in range(MAX_DAMP_RETRIES):
        hd = h.copy()
        hd[np.diag_indices(n)] += d * mean_diag
        try:
            low = np.linalg.cholesky(hd)  # (in, in), hd = L Lᵀ
            low_inv = np.linalg.inv(low)  # L⁻¹, lower triangular
            hinv = low_inv.T @ low_inv  # (H + λI)⁻¹
            upper = np.linalg.cholesky(hinv).T  # (in, in)
            if np.isfinite(upper).all() and (np.diag(upper) > 0).all():
                if attempt:
                    log.warning("%s: Cholesky succeeded with dampening %.3g (asked %.3g)", name, d, damp)
                return upper, d
        except np.linalg.LinAlgError:
            pass
        log.warning("%s: Hessian not positive definite with dampening %.3g; retrying with %.3g", name, d, d * 10)
        d *= 10
    raise QuantizeError(
        f"{name or 'weight'}: the calibration Hessian stays singular even with dampening {d / 10:.3g}; "
        "use more calibration samples or a larger --damp"
    )


def _concat_params(parts: list[Params]) -> Params:
    """Join per-fit-unit params along their unit axis (axis 1; every scheme puts the row first)."""
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray,
    scheme: Scheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    grid: GridMode = "updated",
    name: str = "",
) -> QuantizedTensor:
    """GPTQ codes for `w` (out, in) float32 given H (in, in) on `scheme`'s grid; see the module docstring."""
    w = np.asarray(w, dtype=np.float32)
    scheme.check_shape(w.shape, name or "weight")
    check_finite(w, name)
    rows, cols = w.shape
    assert h.shape == (cols, cols), (h.shape, w.shape)
    if grid not in ("original", "updated"):
        raise QuantizeError(f"{name}: GPTQ grid mode {grid!r} is not 'original' or 'updated'")

    h = np.array(h, dtype=np.float64)
    diag = np.diag(h).copy()  # (in,)
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0

    fit_cols = scheme.fit_cols or cols
    group_cols = scheme.group_cols or cols
    n_units = cols // fit_cols
    groups_per_unit = fit_cols // group_cols
    n_groups = cols // group_cols
    per_matrix = grid == "original" or scheme.per_tensor or n_units == 1

    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)  # scan position -> column
    upper, _ = inverse_hessian_cholesky(h[np.ix_(perm, perm)], damp, name)
    hinv = upper.astype(np.float32)  # (in, in) in scan order

    scale_all = np.zeros((rows, n_groups), dtype=np.float32)
    offset_all = np.zeros((rows, n_groups), dtype=np.float32)
    unit_params: list[Params | None] = [None] * n_units
    if per_matrix:
        params = scheme.fit(w)
        scale_all[:], offset_all[:] = scheme.affine(params)
        unit_params = [params]  # marks every unit as fitted
    pos_of_col = np.empty(cols, dtype=np.int64)
    pos_of_col[perm] = np.arange(cols)

    wt = np.ascontiguousarray(w[:, perm].T)  # (in, out) error-updated weights, scan order
    codes_t = np.zeros((cols, rows), dtype=np.uint8)  # (in, out) scan order
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = wt[i1:i2].copy()  # (count, out)
        err1 = np.zeros_like(w1)  # (count, out)
        h1 = hinv[i1:i2, i1:i2]  # (count, count)
        for k in range(i2 - i1):
            c = int(perm[i1 + k])
            if not per_matrix and unit_params[c // fit_cols] is None:
                u = c // fit_cols
                ucols = np.arange(u * fit_cols, (u + 1) * fit_cols)  # (fit_cols,) format order
                upos = pos_of_col[ucols]
                assert (upos >= i1 + k).all()
                cur = np.empty((fit_cols, rows), dtype=np.float32)  # current weights of the unit
                inb = upos < i2
                cur[inb] = w1[upos[inb] - i1]
                later = upos[~inb]
                # pending lazy updates from this block's already-quantized columns
                cur[~inb] = wt[later] - hinv[i1 : i1 + k][:, later].T @ err1[:k]
                p = scheme.fit(np.ascontiguousarray(cur.T))
                unit_params[u] = p
                gs = slice(u * groups_per_unit, (u + 1) * groups_per_unit)
                scale_all[:, gs], offset_all[:, gs] = scheme.affine(p)
            g = c // group_cols
            s = scale_all[:, g : g + 1]  # (out, 1)
            o = offset_all[:, g : g + 1]
            col = w1[k]  # (out,)
            q_codes = scheme.encode_affine(col[:, None], s, o)  # (out, 1)
            q = scheme.values(q_codes)[:, 0] * s[:, 0] + o[:, 0]  # (out,)
            codes_t[i1 + k] = q_codes[:, 0]
            e = (col - q) / h1[k, k]  # (out,)
            err1[k] = e
            if k + 1 < i2 - i1:
                w1[k + 1 :] -= np.outer(h1[k, k + 1 :], e)
        if i2 < cols:
            wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # (rest, out)

    codes = np.ascontiguousarray(codes_t[pos_of_col].T)  # (out, in) format order
    params = unit_params[0] if per_matrix else _concat_params(unit_params)  # type: ignore[arg-type]
    return QuantizedTensor(scheme=scheme, codes=codes, params=params, name=name)  # type: ignore[arg-type]


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Mean squared output error per token, tr(E H Eᵀ)/2 with E = Ŵ - W — i.e. ||(W - Ŵ) x||² averaged."""
    e = (np.asarray(w_hat, np.float64) - np.asarray(w, np.float64))  # (out, in)
    return float(np.sum((e @ h) * e) / 2.0)
