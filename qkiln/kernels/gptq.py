"""GPTQ's two hot loops in C (qkiln/kernels/src/gptq/gptq.c): the column scan inside a lazy block and IntGrid's
importance-weighted range search.

Both are per-column / per-trial Python loops over small NumPy operations in quantize/ — about 2.5 s of a
demo-model layer's ~5 s at 128 x 512 calibration tokens. The C versions perform the same float32
operations in the same order (no FMA contraction), so they return the same bits as the NumPy definitions
(`quantize.gptq._scan_numpy`, `quantize.int_grid.IntGrid.fit`), which stay the reference and the fallback:
each function here returns None when the library cannot be built or loaded or QKILN_KERNEL=numpy, and the
caller then runs NumPy. Rows are independent in both loops, so they are split over `threads` (0 = one per
core) and the result does not depend on the split. Unset, QKILN_KERNEL takes the AVX-512 variant where the
CPU has it, else the AVX2 one where it has that, else the portable one; QKILN_KERNEL=avx512 forces AVX-512,
another C path name the portable variant (all give the same bits).
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from qkiln.kernels.api import KernelError
from qkiln.kernels.clib import LazyLibrary, env_variant

_vp, _long, _int, _float = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
_LIB = LazyLibrary({
    "qk_gptq_scan": [_int, _vp, _vp, _vp, _long, _long, _vp, _long, _long, _long, _vp, _vp, _vp, _vp,
                     _float, _float, _float, _int],
    "qk_int_fit_t": [_int, _vp, _long, _long, _long, _int, _int, _vp, _vp, _int, _vp, _vp, _int],
    "qk_gptq_variant": [_int],
})
VARIANTS = {"auto": 0, "portable": 1, "avx512": 2, "avx2": 3}
_NAMES = {code: name for name, code in VARIANTS.items()}
_ran: str | None = None  # the variant the last scan_block / int_fit ran


def last_path() -> str | None:
    """The C variant ('portable', 'avx2' or 'avx512') the last `scan_block` or `int_fit` call ran, as the library
    resolved it; None when no C loop has run since `reset_path()` (the NumPy loops ran, or nothing)."""
    return _ran


def reset_path() -> None:
    global _ran
    _ran = None


def _record(lib: Any) -> None:
    global _ran
    _ran = _NAMES[int(lib.qk_gptq_variant(_variant()))]


def _lib() -> Any:
    return _LIB.load() if env_variant() is not None else None


def _variant() -> int:
    return VARIANTS[env_variant() or "auto"]


def _check(rc: int, what: str) -> None:
    if rc == -2:
        raise KernelError(f"{what}: QKILN_KERNEL={env_variant()} cannot run on this CPU")
    if rc == -3:
        raise MemoryError(f"{what}: out of memory")
    if rc < 0:
        raise ValueError(f"{what}: bad arguments (code {rc})")


def available() -> bool:
    """True when the C loops will run (library loaded, QKILN_KERNEL not 'numpy')."""
    return _lib() is not None


def _ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _c_contig(a: np.ndarray, dtype: type) -> bool:
    return a.dtype == dtype and a.flags.c_contiguous


def scan_block(w1: np.ndarray, err1: np.ndarray, codes: np.ndarray, h1: np.ndarray, k0: int, k1: int,
               gidx: np.ndarray, scale_t: np.ndarray, safe_t: np.ndarray, offset_t: np.ndarray,
               shift: float, qmin: float, qmax: float, *, threads: int = 0) -> bool:
    """Columns k0..k1-1 of a lazy block, in place; False (nothing done) when the C library is not in use.

    w1, err1 (count, out) float32 and codes (count, out) uint8 C-contiguous; h1 (count, count) float32 with
    contiguous rows (a view into the full inverse factor is fine); gidx (count,) int32 group per position;
    scale_t / safe_t / offset_t (n_groups, out) float32 C-contiguous. Per column k, for every row r:
    code = clip(floor((w - offset) / safe + 0.5) + shift, qmin, qmax), e = (w - ((code - shift) · scale +
    offset)) / h1[k, k], and w1[j] -= h1[k, j] · e for j > k.
    """
    lib = _lib()
    if lib is None:
        return False
    count, out = w1.shape
    assert all(_c_contig(a, np.float32) for a in (w1, err1, scale_t, safe_t, offset_t)), "float32 C order"
    assert _c_contig(codes, np.uint8) and codes.shape == w1.shape == err1.shape
    assert h1.dtype == np.float32 and h1.shape == (count, count) and h1.strides[1] == 4
    assert _c_contig(gidx, np.int32) and gidx.shape == (count,)
    assert scale_t.shape[1] == out and int(gidx.max(initial=0)) < scale_t.shape[0]
    rc = lib.qk_gptq_scan(_variant(), _ptr(w1), _ptr(err1), _ptr(codes), count, out, _ptr(h1), h1.strides[0] // 4,
                          k0, k1, _ptr(gidx), _ptr(scale_t), _ptr(safe_t), _ptr(offset_t),
                          shift, qmin, qmax, threads)
    _check(rc, "qk_gptq_scan")
    _record(lib)
    return True


def int_fit(wt: np.ndarray, group: int, bits: int, symmetric: bool, importance: np.ndarray,
            shrink: np.ndarray, *, threads: int = 0) -> tuple[np.ndarray, np.ndarray | None, bool] | None:
    """IntGrid's weighted fit of the TRANSPOSED weight wt (cols, rows) float32; None without the library.

    Returns (scale (rows, n_groups) float16, zero (rows, n_groups) uint8 or None when symmetric,
    overflow): overflow is True when some candidate scale does not fit float16 (the caller raises).
    """
    lib = _lib()
    if lib is None:
        return None
    wt = np.ascontiguousarray(wt, dtype=np.float32)
    cols, rows = wt.shape
    ng = cols // group
    imp = np.ascontiguousarray(importance, dtype=np.float32).reshape(-1)
    shr = np.ascontiguousarray(shrink, dtype=np.float32).reshape(-1)
    assert imp.shape == (cols,) and cols % group == 0 and shr.size >= 1
    scale = np.empty((rows, ng), np.float16)  # (rows, n_groups)
    zero = None if symmetric else np.empty((rows, ng), np.uint8)
    rc = lib.qk_int_fit_t(_variant(), _ptr(wt), cols, rows, group, bits, int(symmetric), _ptr(imp), _ptr(shr), shr.size,
                          _ptr(scale), 0 if zero is None else _ptr(zero), threads)
    _check(rc, "qk_int_fit_t")
    _record(lib)
    return scale, zero, rc == 1
