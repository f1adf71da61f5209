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

import dataclasses
import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.kernels import gptq as c_loops
from qkiln.kernels.blas import one_blas_thread
from qkiln.model.source import LazyRows
from qkiln.quantize.scheme import Params, Scheme, UniformGrid, concat_cols, concat_rows, slice_rows
from qkiln.quantize.tensor import QuantizedTensor

log = logging.getLogger(__name__)

GridMode = Literal["original", "updated"]
MAX_DAMP_RETRIES = 6


def check_finite(w: np.ndarray, name: str) -> None:
    """A NaN or Inf in a weight makes every algorithm's output meaningless: say which tensor."""
    if not np.isfinite(w).all():
        bad = int(np.size(w) - np.isfinite(w).sum())
        raise QuantizeError(f"{name or 'weight'}: {bad} NaN/Inf value(s) in the weight; fix the checkpoint")


def _damped_inverse_cholesky(jhj: np.ndarray, mean_diag: float, damp: float, name: str) -> tuple[np.ndarray, float]:
    """U (upper, UᵀU = (H + λI)⁻¹, λ = damp·mean(diag H)) made IN PLACE in `jhj` = J H J (in, in) float32
    C-contiguous (J reverses the order): with L the lower Cholesky factor of J H J, H⁻¹ = (J L⁻ᵀ J)(J L⁻¹ J), so U = J L⁻¹ J.

    LAPACK's potrf then trtri, in place, on the lower triangle only: the strict upper triangle keeps H, from
    which a retry restores the lower one — no copy of the matrix at any point (at 14336 inputs, an 8B model's
    down_proj, one float32 copy is 822 MB). Float32, as the reference GPTQ's factorization. Retries with 10x
    the dampening when H + λI is not numerically positive definite. Returns (U, the damp used)."""
    from scipy.linalg import lapack

    n = jhj.shape[0]
    assert jhj.dtype == np.float32 and jhj.flags.c_contiguous and jhj.shape == (n, n), (jhj.dtype, jhj.shape)
    if not np.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    diag = np.diag(jhj).copy()
    f = jhj.T  # the same memory in Fortran order: its upper triangle is jhj's lower one
    d = damp
    for attempt in range(MAX_DAMP_RETRIES):
        if attempt:
            _restore_lower(jhj)
        jhj[np.diag_indices(n)] = diag + np.float32(d * mean_diag)
        with one_blas_thread():
            _, info = lapack.spotrf(f, lower=0, overwrite_a=1, clean=0)  # Lᵀ in f's upper = L in jhj's lower
            if info == 0:
                _, info = lapack.strtri(f, lower=0, overwrite_c=1)  # L⁻¹ in jhj's lower
        if info == 0:
            _flip_lower_to_upper(jhj)  # U = J L⁻¹ J, zeros below the diagonal
            if np.isfinite(np.diag(jhj)).all() and (np.diag(jhj) > 0).all():
                if attempt:
                    log.warning("%s: Cholesky succeeded with dampening %.3g (asked %.3g)", name, d, damp)
                return jhj, d
            raise QuantizeError(f"{name or 'weight'}: the inverse Hessian is not finite; the calibration "
                                "activations overflowed (check the checkpoint for huge weights)")
        log.warning("%s: Hessian not positive definite with dampening %.3g; retrying with %.3g", name, d, d * 10)
        d *= 10
    raise QuantizeError(
        f"{name or 'weight'}: the calibration Hessian stays singular even with dampening {d / 10:.3g}; "
        "use more calibration samples or a larger --damp"
    )


# Rows of a square matrix moved at a time by the in-place triangle copies (bounded temporaries).
_ROWS = 256


def _restore_lower(a: np.ndarray) -> None:
    """a's strict lower triangle := the transpose of its strict upper one (which potrf/trtri leave alone)."""
    n = a.shape[0]
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        a[r0:r1, :r0] = a[:r0, r0:r1].T
        blk = a[r0:r1, r0:r1]
        low = np.tril_indices(r1 - r0, -1)
        blk[low] = blk.T[low]


def _flip_lower_to_upper(a: np.ndarray) -> None:
    """a := J tril(a) J in place (J reverses rows and columns): the lower triangle, turned, becomes the
    upper one; below the diagonal becomes zero."""
    n = a.shape[0]
    for i0 in range(0, (n + 1) // 2, _ROWS):
        i1 = min((n + 1) // 2, i0 + _ROWS)
        top = np.tril(a[i0:i1], i0)[:, ::-1].copy()  # rows i0..i1 of tril(a), reversed: rows n-1-i of the result
        bottom = np.tril(a[n - i1 : n - i0], n - i1)[::-1, ::-1].copy()  # rows n-i1..n-i0 -> result rows i0..i1
        a[i0:i1] = bottom
        a[n - i1 : n - i0] = top[::-1]


@dataclasses.dataclass(frozen=True)
class PreparedHessian:
    """What GPTQ needs from H, computed once per input and shared by the linears reading it (q/k/v).

    perm       (in,) int64   scan position -> column (descending diag H with act-order, else identity)
    hinv       (in, in) f32  upper Cholesky factor of (H + λI)⁻¹, rows/columns in scan order
    damp       float         the dampening finally used
    importance (in,) f32     mean squared activation per input column, diag(H)/2 (llama.cpp's imatrix)
    """

    perm: np.ndarray
    hinv: np.ndarray
    damp: float
    importance: np.ndarray


def prepare_hessian(h: np.ndarray, *, damp: float = 0.01, act_order: bool = False, name: str = "",
                    overwrite: bool = False) -> PreparedHessian:
    """Dead inputs (H_ii == 0) decoupled, optional act-order permutation, dampened inverse Cholesky.

    `overwrite`: a float32 C-contiguous `h` becomes the result's `hinv` (permuted, factored and inverted in
    place — calibration's Hessians, which nothing reads afterwards); otherwise one float32 copy is made."""
    n = h.shape[0]
    diag = np.diag(h).astype(np.float64)  # (in,)
    importance = (np.maximum(diag, 0) / 2).astype(np.float32)  # (in,)
    dead = diag <= 0  # (in,) decoupled: row and column 0, H_ii := 1
    diag = np.where(dead, 1.0, diag)
    perm = np.argsort(-diag, kind="stable") if act_order else np.arange(n)
    rev = perm[::-1]
    in_place = overwrite and h.dtype == np.float32 and h.flags.c_contiguous and h.flags.writeable
    jhj = h if in_place else np.array(h, dtype=np.float32, order="C")
    _permute_symmetric(jhj, rev)  # J P H P J, scan order reversed
    dead_r = np.flatnonzero(dead[rev])
    jhj[dead_r, :] = 0.0
    jhj[:, dead_r] = 0.0
    jhj[dead_r, dead_r] = 1.0
    upper, used = _damped_inverse_cholesky(jhj, float(np.mean(diag)), damp, name)
    return PreparedHessian(perm=perm, hinv=upper, damp=used, importance=importance)


def _permute_symmetric(a: np.ndarray, order: np.ndarray) -> None:
    """a := a[order][:, order] in place, with temporaries of a block of rows and one row."""
    n = a.shape[0]
    if np.array_equal(order, np.arange(n)):
        return
    for r0 in range(0, n, _ROWS):
        a[r0 : r0 + _ROWS] = a[r0 : r0 + _ROWS][:, order]
    done = np.zeros(n, dtype=bool)
    for start in range(n):  # rows by cycles: row i takes row order[i]
        if done[start] or order[start] == start:
            continue
        first = a[start].copy()
        i = start
        while True:
            done[i] = True
            j = int(order[i])
            if j == start:
                a[i] = first
                break
            a[i] = a[j]
            i = j


class _ColumnCoder:
    """Codes and values of one column on fixed per-row (scale, offset): the scheme's `encode_affine`,
    or — for uniform integer grids, the hot case — the same rule (floor(x + 0.5) + shift, clamped to the
    code range) inlined, which the C scan (`kernels.gptq.scan_block`) also implements."""

    def __init__(self, scheme: Scheme):
        self.scheme = scheme
        t = type(scheme)
        self.fast = isinstance(scheme, UniformGrid) and (
            t.encode_affine is UniformGrid.encode_affine and t.values is UniformGrid.values
        )
        if self.fast:
            assert isinstance(scheme, UniformGrid)
            self.shift = np.float32(scheme.shift)
            self.qmin, self.qmax = (np.float32(v) for v in scheme.code_range)

    def __call__(self, col: np.ndarray, s: np.ndarray, s_safe: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """col, s, o (rows,) float32 -> (codes uint8, dequantized float32); s_safe = s with 0 -> inf."""
        if self.fast:
            qf = np.floor((col - o) / s_safe + np.float32(0.5))
            qf += self.shift
            np.clip(qf, self.qmin, self.qmax, out=qf)
            return qf.astype(np.uint8), (qf - self.shift) * s + o
        codes = self.scheme.encode_affine(col[:, None], s[:, None], o[:, None])[:, 0]
        return codes, self.scheme.values(codes) * s + o


def _scan_numpy(coder: _ColumnCoder, w1: np.ndarray, err1: np.ndarray, codes: np.ndarray, h1: np.ndarray,
                k0: int, k1: int, gidx: np.ndarray, scale_t: np.ndarray, safe_t: np.ndarray,
                offset_t: np.ndarray) -> None:
    """Columns k0..k1-1 of a lazy block (count, out), in place: code each on its group's grid, record
    e = (w - q) / U_kk and push it onto the block's later columns (rank 1)."""
    count = w1.shape[0]
    for k in range(k0, k1):  # hot loop: one iteration per column of the matrix
        g = gidx[k]
        col = w1[k]  # (out,)
        codes[k], q = coder(col, scale_t[g], safe_t[g], offset_t[g])
        e = (col - q) / h1[k, k]  # (out,)
        err1[k] = e
        if k + 1 < count:
            w1[k + 1 :] -= h1[k, k + 1 :, None] * e[None, :]


def gptq_quantize(
    w: np.ndarray,
    h: np.ndarray | PreparedHessian,
    scheme: Scheme,
    *,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    grid: GridMode = "updated",
    weighted_fit: bool = True,
    name: str = "",
) -> QuantizedTensor:
    """GPTQ codes for `w` (out, in) float32 given H (in, in) on `scheme`'s grid; see the module docstring.

    `h` may be a `PreparedHessian` (then `damp`/`act_order` are the ones it was prepared with).
    `weighted_fit`: the format's params are fitted with the calibration's mean squared activation per
    column as importance (llama.cpp's imatrix rule, for the grids that have one), not plain RTN's rule.
    """
    w = np.asarray(w, dtype=np.float32)
    scheme.check_shape(w.shape, name or "weight")
    check_finite(w, name)
    rows, cols = w.shape
    if grid not in ("original", "updated"):
        raise QuantizeError(f"{name}: GPTQ grid mode {grid!r} is not 'original' or 'updated'")
    prep = h if isinstance(h, PreparedHessian) else prepare_hessian(h, damp=damp, act_order=act_order, name=name)
    assert prep.hinv.shape == (cols, cols), (prep.hinv.shape, w.shape)
    perm, hinv = prep.perm, prep.hinv

    fit_cols = scheme.fit_cols or cols
    group_cols = scheme.group_cols or cols
    n_units = cols // fit_cols
    groups_per_unit = fit_cols // group_cols
    n_groups = cols // group_cols
    per_matrix = grid == "original" or scheme.per_tensor or n_units == 1

    scale_all = np.zeros((rows, n_groups), dtype=np.float32)  # (out, n_groups)
    offset_all = np.zeros((rows, n_groups), dtype=np.float32)
    unit_params: list[Params | None] = [None] * n_units

    def set_grid(gs: slice, params: Params) -> None:
        sc, of = scheme.affine(params)
        scale_all[:, gs], offset_all[:, gs] = sc, of

    if per_matrix:
        params = scheme.fit(w, prep.importance if weighted_fit else None)
        set_grid(slice(None), params)
        unit_params = [params] * n_units
    pos_of_col = np.empty(cols, dtype=np.int64)
    pos_of_col[perm] = np.arange(cols)
    coder = _ColumnCoder(scheme)
    scale_t = np.ascontiguousarray(scale_all.T)  # (n_groups, out): a group's scales contiguous
    safe_t = np.where(scale_t == 0, np.float32(np.inf), scale_t)
    offset_t = np.ascontiguousarray(offset_all.T)

    # Scan positions where a fit unit is first reached: its params are fitted there, on the weights as
    # the error feedback has left them (grid="updated"); between two such events the scan runs unbroken.
    unit_first = np.full(n_units, cols, dtype=np.int64)
    if not per_matrix:
        np.minimum.at(unit_first, np.arange(cols) // fit_cols, pos_of_col)
    events = sorted({int(p) for p in unit_first} | {cols})
    group_of_pos = (perm // group_cols).astype(np.int32)  # (in,) group of each scan position
    use_c = coder.fast and c_loops.available()

    wt = w.T.take(perm, axis=0)  # (in, out) error-updated weights, scan order (wᵀ's rows: 2.4x w[:, perm].T)
    codes_t = np.zeros((cols, rows), dtype=np.uint8)  # (in, out) scan order
    # The block updates' products on one BLAS thread: a threaded sgemm gave other sums on 2 threads than on 1
    # (the head's 49152 rows, on an AVX2 host), and the bytes must not depend on the machine's cores.
    with one_blas_thread():
        ev = 0
        for i1 in range(0, cols, block_size):
            i2 = min(i1 + block_size, cols)
            w1 = wt[i1:i2].copy()  # (count, out)
            err1 = np.zeros_like(w1)  # (count, out)
            h1 = hinv[i1:i2, i1:i2]  # (count, count)
            k = 0
            while k < i2 - i1:
                while events[ev] == i1 + k:  # fit the units first reached here
                    for u in np.flatnonzero(unit_first == events[ev]):
                        ucols = np.arange(u * fit_cols, (u + 1) * fit_cols)  # (fit_cols,) format order
                        upos = pos_of_col[ucols]
                        cur = np.empty((fit_cols, rows), dtype=np.float32)  # the unit's current weights
                        inb = upos < i2
                        cur[inb] = w1[upos[inb] - i1]
                        later = upos[~inb]
                        # plus the lazy updates still pending from this block's already-quantized columns
                        cur[~inb] = wt[later] - hinv[i1 : i1 + k][:, later].T @ err1[:k]
                        unit_params[u] = p = scheme.fit(cur.T, prep.importance[ucols] if weighted_fit else None)
                        gs = slice(u * groups_per_unit, (u + 1) * groups_per_unit)
                        set_grid(gs, p)
                        scale_t[gs] = scale_all[:, gs].T
                        safe_t[gs] = np.where(scale_t[gs] == 0, np.float32(np.inf), scale_t[gs])
                        offset_t[gs] = offset_all[:, gs].T
                    ev += 1
                k_end = min(events[ev] - i1, i2 - i1)
                gidx = group_of_pos[i1:i2]
                if not (use_c and c_loops.scan_block(w1, err1, codes_t[i1:i2], h1, k, k_end, gidx, scale_t, safe_t,
                                                      offset_t, float(coder.shift), float(coder.qmin),
                                                      float(coder.qmax))):
                    _scan_numpy(coder, w1, err1, codes_t[i1:i2], h1, k, k_end, gidx, scale_t, safe_t, offset_t)
                k = k_end
            if i2 < cols:
                wt[i2:] -= hinv[i1:i2, i2:].T @ err1  # (rest, out)

    codes = np.ascontiguousarray(codes_t[pos_of_col].T)  # (out, in) format order
    params = unit_params[0] if per_matrix else concat_cols(unit_params)  # type: ignore[arg-type]
    return QuantizedTensor(scheme=scheme, codes=codes, params=params, name=name)  # type: ignore[arg-type]


# Rows of the stacked weights GPTQ scans at a time (`gptq_quantize_shared`): rows are independent given H, so
# a block of rows at a time bounds the working copies (weights, their transpose, codes) at an 8B model's
# gate/up (28672 x 4096: 0.5 GB per float32 copy) to 128 MB each.
GPTQ_ROW_FLOATS = 1 << 25


def gptq_quantize_shared(
    weights: Mapping[str, np.ndarray | LazyRows],
    prep: PreparedHessian,
    scheme: Scheme,
    *,
    block_size: int = 128,
    grid: GridMode = "updated",
    weighted_fit: bool = True,
    row_floats: int = GPTQ_ROW_FLOATS,
) -> dict[str, QuantizedTensor]:
    """GPTQ for one or several linears reading the same input (q/k/v, gate/up) on one scheme.

    GPTQ treats rows independently given H, so the matrices' rows are stacked and scanned as one — one
    column scan instead of several (the scan is Python-loop bound) — a block of at most `row_floats`
    weights at a time (read from `LazyRows` as they are needed). Equal to quantizing each matrix alone up to
    float32 summation order. Per-tensor schemes, whose single scale must stay per matrix, go one matrix at a
    time, whole."""
    names = list(weights)
    if scheme.per_tensor:
        return {n: gptq_quantize(np.asarray(weights[n], np.float32), prep, scheme, block_size=block_size,
                                 grid=grid, weighted_fit=weighted_fit, name=n) for n in names}
    shapes = {n: tuple(weights[n].shape) for n in names}
    for n in names:
        scheme.check_shape(shapes[n], n)
    cols = shapes[names[0]][1]
    starts = np.cumsum([0] + [shapes[n][0] for n in names])  # each matrix's first row in the stack
    total = int(starts[-1])
    step = max(1, row_floats // cols)
    codes = np.empty((total, cols), np.uint8)
    parts: list[Params] = []
    label = "+".join(names)
    for r0 in range(0, total, step):
        r1 = min(total, r0 + step)
        block = np.empty((r1 - r0, cols), np.float32)  # rows r0:r1 of the stack, read matrix by matrix
        for n, s0 in zip(names, starts[:-1], strict=True):
            a, b = max(r0, int(s0)), min(r1, int(s0) + shapes[n][0])
            if a < b:
                block[a - r0 : b - r0] = weights[n][a - s0 : b - s0]
        check_finite(block, label)
        qt = gptq_quantize(block, prep, scheme, block_size=block_size, grid=grid, weighted_fit=weighted_fit,
                           name=label)
        codes[r0:r1] = qt.codes
        parts.append(qt.params)
        del block, qt
    params = concat_rows(parts)
    out: dict[str, QuantizedTensor] = {}
    for n, s0 in zip(names, starts[:-1], strict=True):
        r0, r1 = int(s0), int(s0) + shapes[n][0]
        rows = codes[r0:r1] if len(names) == 1 else codes[r0:r1].copy()  # a matrix alone owns the whole array
        out[n] = QuantizedTensor(scheme=scheme, codes=rows, params=slice_rows(params, r0, r1), name=n)
    return out


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """Mean squared output error per token, tr(E H Eᵀ)/2 with E = Ŵ - W — i.e. ||(W - Ŵ) x||² averaged."""
    e = (np.asarray(w_hat, np.float64) - np.asarray(w, np.float64))  # (out, in)
    return float(np.sum((e @ h) * e) / 2.0)
