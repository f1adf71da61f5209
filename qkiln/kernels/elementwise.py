"""RMSNorm, SiLU·up and RoPE in C: one pass per row where NumPy makes three to five over whole arrays.

With the matrix products on AMX and attention fused in C, these element-wise steps were ~40 % of a
calibration batch (qkiln/kernels/src/elementwise/). Same signatures, semantics and return types as
kernels.reference.rms_norm, silu_mul and apply_rope, which stay the reference and
the fallback: used when the C library cannot be built or loaded, with QKILN_KERNEL=numpy, and for inputs
the C functions do not take (not float32, not 2-D / 4-D, a non-contiguous last axis, negative strides).
Unset, QKILN_KERNEL takes the best C variant (AVX-512 where the CPU has it, else the portable one, which
also beats NumPy; on x86-64 its row functions are GCC target clones, AVX2 where the CPU has it, with the same
bits); QKILN_KERNEL=avx512 forces AVX-512, any other C path name the portable variant. One 4096-token batch of
the demo model on a Zen 3 guest (bench/elementwise_bench.py): silu_mul 22.7 ms in NumPy, 15.6 ms in the
portable variant on SSE2 vectors, 8.6 ms in its AVX2 clone.

Agreement with NumPy (elementwise.h says why; the tests check these bounds):
    apply_rope  bit for bit.
    rms_norm    |Δ| ≤ RMS_RTOL · |ref|: only the sum of squares differs (float64 here, float32 in NumPy).
    silu_mul    |Δ| ≤ SILU_RTOL · |ref| + SILU_ATOL: only e^x differs (this polynomial is within 1.2 ulp,
                NumPy's expf within 2.4 ulp of exact); the absolute term covers results rounded into subnormals.
rms_norm and apply_rope give the same bits on both C variants (silu_mul's AVX-512 e^x uses FMAs).
`threads`: 1 (the default) runs on the calling thread, which calibration wants (it runs batches in
parallel itself); n > 1 splits rows over n threads, 0 over one per core; either way at most one thread per
32768 floats, and the result does not depend on it.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from qkiln.kernels import reference
from qkiln.kernels.api import KernelError
from qkiln.kernels.clib import LazyLibrary, env_variant, fits_out, into
from qkiln.kernels.reference import BF16

# Measured on random rows (scales 0.01..100): rms_norm ≤ 5.5e-7 relative for n ≤ 1536 (1.0e-6 at n = 16384,
# NumPy's float32 sum losing more as n grows); silu_mul ≤ 4.2e-7 relative on normal results (gates -100..30)
# and ≤ 2 subnormal steps on results rounded into subnormals.
RMS_RTOL = 2e-6
SILU_RTOL = 1e-6
SILU_ATOL = 3 * float(np.finfo(np.float32).smallest_subnormal)  # absolute, for subnormal results

VARIANTS = {"auto": 0, "portable": 1, "avx512": 2}
_VARIANT_NAMES = {1: "portable", 2: "avx512"}


_vp = ctypes.c_void_p
_longs3 = ctypes.c_long * 3


_c_int, _c_long, _c_float = ctypes.c_int, ctypes.c_long, ctypes.c_float
_LIB = LazyLibrary({
    "qk_rms_norm": [_c_int, _vp, _c_long, _vp, _vp, _c_long, _c_long, _c_float, _c_int, _c_int],
    "qk_silu_mul": [_c_int, _vp, _c_long, _vp, _c_long, _vp, _c_long, _c_long, _c_int, _c_int],
    "qk_apply_rope": [_c_int, _vp, _vp, _vp, _c_long, _vp, _c_long, _vp, _c_long, _c_long, _c_long, _c_long, _c_int],
    "qk_elementwise_exp": [_c_int, _vp, _vp, _c_long],
    "qk_elementwise_variant": [],
    "qk_round_bf16": [_vp, _vp, _c_long, _c_int],
    "qk_widen_bf16": [_vp, _vp, _c_long],
})


def _load() -> Any:
    """The kernel library with this module's entry points declared, or None (see `clib.LazyLibrary`)."""
    return _LIB.load()


_env_variant = env_variant


def variant_name(variant: str = "auto") -> str:
    """The C variant `variant` runs here ('portable' or 'avx512'), or 'numpy' without the library."""
    lib = _load()
    if lib is None:
        return "numpy"
    code = VARIANTS[variant]
    return _VARIANT_NAMES[int(lib.qk_elementwise_variant()) if code == 0 else code]


def _ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _rows_ok(a: np.ndarray, ndim: int) -> bool:
    """float32, `ndim` axes, last axis contiguous, strides non-negative whole floats (the C functions' input)."""
    return (a.dtype == np.float32 and a.ndim == ndim and (a.shape[-1] <= 1 or a.strides[-1] == 4)
            and all(st >= 0 and st % 4 == 0 for st in a.strides)
            and (ndim != 2 or a.shape[0] <= 1 or a.strides[0] >= 4 * a.shape[1]))  # rows do not overlap


def _row_stride(a: np.ndarray) -> int:
    """Floats between rows of a 2-D array (the row length when there is at most one row: any is fine)."""
    return a.strides[0] // 4 if a.shape[0] > 1 else a.shape[1]


def _check(rc: int, variant: str, what: str) -> None:
    if rc == -2:
        raise KernelError(f"element-wise variant {variant!r} cannot run on this CPU")
    if rc != 0:
        raise ValueError(f"{what}: bad sizes (code {rc})")


def _want() -> tuple[Any, str]:
    """(library, variant) for the C path, or (None, "") for NumPy."""
    want = _env_variant()
    lib = _load() if want is not None else None
    return (lib, want) if lib is not None and want is not None else (None, "")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, *, threads: int = 1,
             out: np.ndarray | None = None) -> np.ndarray:
    """x (t, hidden) -> x * rsqrt(mean(x^2) + eps) * weight, float32: a new (t, hidden) array, or `out`.

    `out` may be bfloat16: the float32 result rounded by `kernels.bf16.round_bf16`'s rule (an activation
    that only feeds bfloat16 products, stored as they would round it)."""

    lib, variant = _want()
    obf16 = out is not None and out.dtype == BF16
    if (lib is None or not _rows_ok(x, 2) or x.shape[1] == 0 or weight.dtype != np.float32
            or weight.shape != (x.shape[1],) or (out is not None and not fits_out(out, x.shape, (np.float32, BF16)))):
        got = reference.rms_norm(x, weight, eps)
        return store_rounded(got, out) if obf16 and out is not None else into(got, out)
    t, n = x.shape
    w = np.ascontiguousarray(weight)  # (n,)
    out = np.empty((t, n), np.float32) if out is None else out  # (t, n)
    _check(lib.qk_rms_norm(VARIANTS[variant], _ptr(x), _row_stride(x), _ptr(w), _ptr(out), t, n,
                           eps, int(threads), int(obf16)), variant, "rms_norm")  # c_float rounds eps as np.float32 does
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray, *, threads: int = 1, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, (t, inter) float32 (a new array, or `out`); exp
    overflow gives 0.

    gate and up may be column slices of one (t, 2 * inter) array (any row stride). `out` may be bfloat16:
    the float32 result rounded by `kernels.bf16.round_bf16`'s rule (as for `rms_norm`)."""

    lib, variant = _want()
    obf16 = out is not None and out.dtype == BF16
    if lib is None or gate.shape != up.shape or gate.ndim not in (1, 2) or not (
            _rows_ok(gate, gate.ndim) and _rows_ok(up, up.ndim)) or (
            out is not None and not fits_out(out, gate.shape, (np.float32, BF16))):
        got = reference.silu_mul(gate, up)
        return store_rounded(got, out) if obf16 and out is not None else into(got, out)
    g2 = gate.reshape(1, -1) if gate.ndim == 1 else gate  # (t, n) view
    u2 = up.reshape(1, -1) if up.ndim == 1 else up  # (t, n) view
    t, n = g2.shape
    given = out
    out = np.empty((t, n), np.float32) if out is None else out.reshape(t, n)  # (t, n)
    _check(lib.qk_silu_mul(VARIANTS[variant], _ptr(g2), _row_stride(g2), _ptr(u2), _row_stride(u2), _ptr(out),
                           t, n, int(threads), int(obf16)), variant, "silu_mul")
    return given if given is not None else out.reshape(gate.shape)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """Rotate (b, s, heads, head_dim) by position (first half pairs with second half), a new contiguous array.

    cos/sin are (s, head_dim // 2): out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. x may be any strided
    view with a contiguous last axis (the q or k columns of the fused qkv product, reshaped)."""
    lib, variant = _want()
    ok = lib is not None and _rows_ok(x, 4) and x.shape[-1] % 2 == 0
    if ok:
        b, s, h, d = x.shape
        ok = all(_rows_ok(c, 2) and c.shape == (s, d // 2) for c in (cos, sin))
    if not ok:
        return reference.apply_rope(x, cos, sin)
    out = np.empty((b, s, h, d), np.float32)  # (b, s, heads, d)
    xs = _longs3(*(st // 4 for st in x.strides[:3]))
    _check(lib.qk_apply_rope(VARIANTS[variant], _ptr(x), ctypes.addressof(xs), _ptr(cos), _row_stride(cos),
                             _ptr(sin), _row_stride(sin), _ptr(out), b, s, h, d, int(threads)),
           variant, "apply_rope")
    return out


def exp_approx(x: np.ndarray, variant: str = "auto") -> np.ndarray:
    """The kernels' e^x applied to x (float32), for its error test."""
    lib = _load()
    if lib is None:
        raise KernelError(f"the C element-wise kernels are unavailable: {_LIB.error}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    _check(lib.qk_elementwise_exp(VARIANTS[variant], _ptr(x), _ptr(y), x.size), variant, "exp")
    return y


def round_bf16(a: np.ndarray) -> np.ndarray:
    """`kernels.reference.round_bf16` (float32 -> the nearest bfloat16 values, as float32, by the products'
    rule) in one C pass where the NumPy function makes five; the same bits (tested on every kind of bit
    pattern). Any float32 array; a new C-contiguous array of its shape."""
    lib, _ = _want()
    x = np.ascontiguousarray(a, dtype=np.float32)
    if lib is None:
        return reference.round_bf16(x)
    out = np.empty(x.shape, np.float32)
    _check(lib.qk_round_bf16(_ptr(x), _ptr(out), x.size, 1), "auto", "round_bf16")
    return out


def widen(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """`kernels.reference.widen` (a bfloat16 array's exact float32 values, into `out` when given; any other
    dtype as it is) in C for a C-contiguous input: the same bits."""
    lib, _ = _want()
    if x.dtype != BF16 or lib is None or not x.flags.c_contiguous or (
            out is not None and not (out.flags.c_contiguous and out.shape == x.shape and out.dtype == np.float32)):
        return reference.widen(x, out)
    got = np.empty(x.shape, np.float32) if out is None else out
    _check(lib.qk_widen_bf16(_ptr(x), _ptr(got), x.size), "auto", "widen")
    return got


def store_rounded(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values into a C-contiguous bfloat16 `out` of their shape, rounded by `round_bf16`'s rule; out.
    (Other layouts of `out`: `kernels.reference.store_rounded`.)"""
    lib, _ = _want()
    x = np.ascontiguousarray(values, dtype=np.float32)
    if lib is None or not out.flags.c_contiguous or out.shape != x.shape:
        return reference.store_rounded(x, out)
    _check(lib.qk_round_bf16(_ptr(x), _ptr(out), x.size, 0), "auto", "store_rounded")
    return out
