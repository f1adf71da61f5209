"""Prefill causal attention in C: one fused pass per (batch, kv head, query block), flash-attention style.

`kernels.reference.causal_attention` (NumPy) materializes score blocks and makes several passes over them
(batched QKᵀ with inner dimension 64, mask, max, exp, sum, PV); calibration and `qkiln eval` spend a
large share of their time there. The C kernel (qkiln/kernels/src/attention/) streams key blocks with an online
softmax instead and never builds the score matrix. Same signature, semantics and return as the NumPy
function, which stays the reference and the fallback: used when the C library cannot be built or loaded,
or with QKILN_KERNEL=numpy. Unset, it takes the AVX-512 variant where the CPU has it, else the AVX2 one (8-float
vector tiles with FMA: x86-64 CPUs without AVX-512, AMD Zen 2/3), and NumPy elsewhere (the portable C variant,
4-float vector tiles for SSE2/NEON, is slower than NumPy's BLAS on x86-64 and untimed on real Arm hardware);
QKILN_KERNEL=scalar (or any C path other than avx512) forces the portable variant, QKILN_KERNEL=avx512 the
AVX-512 one. Measured on a Zen 3 guest at calibration's shape (8 x 512 tokens, 9 heads over 3, d 64;
bench/attention_bench.py): NumPy 97.9 ms, the AVX2 unit 37.1 ms on one thread (2.6x; 65 GFLOP/s), the portable
one 151 ms.

Agreement with NumPy: max|Δ| ≤ ATOL_REL · max|v| · (1 + max|score| / 16) (see ATOL_REL).

precision="bfloat16" (GPTQ calibration with the bf16 engine, whose linears already round to bf16) runs a bf16
variant (qkiln/kernels/src/attention/attention_bf16.c) when QKILN_KERNEL is unset or avx512: "amx_bf16" where
the CPU and OS allow AMX tiles, else "avx512_bf16" where the CPU has AVX512_BF16 (AMD Zen 4/5, Intel Cooper
Lake). Both round the scaled queries, keys, probabilities and values to bf16 (nearest even); products are exact
and sums float32 (tdpbf16ps, vdpbf16ps), the softmax itself float32 as in the AVX-512 unit (exp2 polynomial
cut to degree 4, 4e-5 relative). Measured: amx_bf16 2.1-2.6x the float32 AVX-512 variant on one thread at
calibration's shape (5x at t = 2048, d = 128) on a Sapphire Rapids guest; avx512_bf16 1.7x (1.85x) on a Zen 4
guest (bench/attention_bench.py).
Agreement with the float32 result: BF16_ATOL_REL. Anywhere else bfloat16 falls back to the float32 path, which
is more precise and slower. Runtime eval/generate keep float32.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from qkiln.kernels import bf16, reference
from qkiln.kernels.api import KernelError
from qkiln.kernels.clib import LazyLibrary, env_variant, fits_out, into

# Tolerance against kernels.reference.causal_attention, relative to max|v|: the polynomial 2^x is within
# ~1 ulp of 2^x, the query scale log2(e)/sqrt(d) adds one rounding to each score, each score's fp32 dot
# product of d terms may differ from BLAS's by a few ulp of Σ|q_i k_i| (so the bound grows with the score
# magnitude), and the softmax sums and PV products are fp32 sums of up to t terms in another order (online
# rescaling adds one rounding per key block). Measured: ≤ 3.5e-7 · max|v| on random data up to t = 2048,
# 1.7e-6 with scores of magnitude ~100 (portable variant; AVX-512 1.7e-7).
ATOL_REL = 1e-5

# Tolerance of the bf16 variants against the float32 result, relative to max|v|: bf16 keeps 8
# significant bits, so each score carries a relative error ~2^-9 of Σ|q_i k_i| / sqrt(d), each probability
# and value one more rounding; the output is a probability-weighted mean of values, so errors average over
# the visible keys (a row seeing one key gets bf16(v) exactly, 2^-9 relative). Measured max|Δ| / max|v|:
# ≤ 2.8e-3 on random normal data (scores ~N(0, 1)), shapes up to t = 2048, d 8..200; 3.6e-3, 4.2e-3 and
# 5.6e-3 (rms of Δ 1.2e-3 .. 2.2e-3 of the output's) with the demo model's layers 0, 5 and 15 q/k/v
# projections of calibration text (8 x 512 tokens), whose scores are larger. Peakier scores scale the
# score error, as for ATOL_REL.
BF16_ATOL_REL = 1e-2

VARIANTS = {"auto": 0, "portable": 1, "avx512": 2, "amx_bf16": 3, "avx512_bf16": 4, "avx2": 5}
_VARIANT_NAMES = {1: "portable", 2: "avx512", 3: "amx_bf16", 4: "avx512_bf16", 5: "avx2"}
FAST_VARIANTS = ("avx512", "avx2")  # the float32 variants 'auto' takes over NumPy
BF16_VARIANTS = ("amx_bf16", "avx512_bf16")
PRECISIONS = ("float32", "bfloat16")


_vp = ctypes.c_void_p
_longs3 = ctypes.c_long * 3


_LIB = LazyLibrary({
    "qk_causal_attention_ex": [ctypes.c_int, _vp, _vp, _vp, _vp, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int, ctypes.c_int, ctypes.c_int, _vp, _vp, _vp, ctypes.c_int],
    "qk_decode_attention": [ctypes.c_int, _vp, _vp, _vp, _vp, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                            ctypes.c_int, ctypes.c_int, _vp, _vp, _vp, ctypes.c_int],
    "qk_attention_exp2": [ctypes.c_int, _vp, _vp, ctypes.c_long],
    "qk_attention_variant": [],
    "qk_attention_bf16_variant": [],
})


def _load() -> Any:
    """The kernel library with this module's entry points declared, or None (see `clib.LazyLibrary`)."""
    return _LIB.load()


_env_variant = env_variant


def bf16_variant() -> str | None:
    """The fastest bf16 variant that can run here ("amx_bf16": AVX-512, AMX-BF16 and Linux granted this process
    the tile state; else "avx512_bf16": AVX512_BF16), or None (or without the library)."""
    lib = _load()
    code = int(lib.qk_attention_bf16_variant()) if lib is not None else 0
    return _VARIANT_NAMES[code] if code else None


def bf16_available(variant: str) -> bool:
    """True when the bf16 `variant` can run here (a CPU with AMX has AVX512_BF16 too)."""
    if variant == "amx_bf16":
        return bf16_variant() == "amx_bf16"
    return variant == "avx512_bf16" and bf16.available("avx512bf16")  # the products' CPU test, same library


def available(variant: str) -> bool:
    """True when the float32 C `variant` ('portable', 'avx2', 'avx512') can run here."""
    lib = _load()
    x = np.zeros(1, np.float32)
    return lib is not None and lib.qk_attention_exp2(VARIANTS[variant], _ptr(x), _ptr(x), 1) == 0


def variant_name(variant: str = "auto") -> str:
    """The C variant `variant` runs on this machine ('portable', 'avx2' or 'avx512'; 'auto' never means a bf16
    one), or 'numpy' without the library."""
    lib = _load()
    if lib is None:
        return "numpy"
    code = VARIANTS[variant]
    return _VARIANT_NAMES[int(lib.qk_attention_variant()) if code == 0 else code]


def _ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def _elem_strides(a: np.ndarray) -> np.ndarray:
    """a with float32 dtype and a contiguous last axis (a view when it already is), for the C strides."""
    a = np.asarray(a, dtype=np.float32)
    if a.strides[-1] != 4 or any(st % 4 for st in a.strides):
        a = np.ascontiguousarray(a)
    return a


def causal_attention_c(q: np.ndarray, keys: np.ndarray, values: np.ndarray, *, threads: int = 0,
                       variant: str = "auto", out: np.ndarray | None = None, single_query: bool = False) -> np.ndarray:
    """The C kernel alone (raises KernelError without the library): same contract as causal_attention.
    `single_query` (s == 1 only) runs qk_decode_attention, the decode step's attention (a head per task, sums in
    another order), instead of the units."""
    lib = _load()
    if lib is None:
        raise KernelError(f"the C attention kernel is unavailable: {_LIB.error}")
    q, keys, values = _elem_strides(q), _elem_strides(keys), _elem_strides(values)
    b, s, n_heads, d = q.shape
    kb, kv_heads, t, kd = keys.shape
    if values.shape != keys.shape or kb != b or kd != d or t < s or n_heads % kv_heads or (single_query and s != 1):
        raise ValueError(f"attention shapes q {q.shape}, keys {keys.shape}, values {values.shape} do not fit")
    if out is None or not fits_out(out, (b * s, n_heads * d)):
        got = causal_attention_c(q, keys, values, threads=threads, variant=variant, single_query=single_query,
                                 out=np.empty((b * s, n_heads * d), np.float32))  # (b * s, heads * d)
        return into(got, out)
    qs, ks, vs = (_longs3(*(st // 4 for st in a.strides[:3])) for a in (q, keys, values))
    strides = (ctypes.addressof(qs), ctypes.addressof(ks), ctypes.addressof(vs))
    if single_query:
        rc = lib.qk_decode_attention(VARIANTS[variant], _ptr(q), _ptr(keys), _ptr(values), _ptr(out), b, t, n_heads,
                                     kv_heads, d, *strides, int(threads))
    else:
        rc = lib.qk_causal_attention_ex(VARIANTS[variant], _ptr(q), _ptr(keys), _ptr(values), _ptr(out), b, s, t,
                                        n_heads, kv_heads, d, *strides, int(threads))
    if rc == -2:
        raise KernelError(f"attention variant {variant!r} cannot run on this CPU")
    if rc != 0:
        raise MemoryError(f"qk_causal_attention failed (code {rc})") if rc == -3 else ValueError(f"code {rc}")
    return out


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, *, threads: int = 0,
                     out: np.ndarray | None = None, precision: str = "float32") -> np.ndarray:
    """Grouped-query causal attention; returns (b * s, heads * head_dim) float32 (written into `out` when
    given: a (b * s, heads * head_dim) float32 array, so calibration skips a copy).

    q: (b, s, heads, d) rotated queries; keys, values: (b, kv_heads, t, d) with t >= s, the queries
    being the last s of the t positions. Query head h reads kv head h // n_rep. Any strides (copied only
    when the last axis is not contiguous). threads: 0 = one per core; calibration, which runs batches in
    parallel itself, passes 1. precision: "float32" (default), or "bfloat16" to allow the faster bf16 variants
    (module docstring; falls back to float32 where none can run or QKILN_KERNEL asks for another path).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"attention precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    want = _env_variant()
    fast = bf16_variant() if precision == "bfloat16" and want in ("auto", "avx512") else None
    if fast is not None:
        return causal_attention_c(q, keys, values, threads=threads, variant=fast, out=out)
    if want is None or _load() is None or (want == "auto" and variant_name() not in FAST_VARIANTS):
        got = reference.causal_attention(q, keys, values)
        return into(got, out)
    return causal_attention_c(q, keys, values, threads=threads, variant=want, out=out)


def exp2_approx(x: np.ndarray, variant: str = "auto") -> np.ndarray:
    """The kernel's softmax 2^x applied to x (float32), for its error test. (Scores are kept in base 2:
    log2 e is folded into the query scale, so e^(s - m) is computed as 2^(s·log2 e - m·log2 e).) Float32
    variants only: the bf16 variants' degree-4 polynomial is not exposed (KernelError)."""
    if variant in BF16_VARIANTS:
        raise KernelError(f"exp2_approx covers the float32 variants; {variant}'s degree-4 polynomial is not exposed")
    lib = _load()
    if lib is None:
        raise KernelError(f"the C attention kernel is unavailable: {_LIB.error}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.empty_like(x)
    if lib.qk_attention_exp2(VARIANTS[variant], _ptr(x), _ptr(y), x.size) != 0:
        raise KernelError(f"attention variant {variant!r} cannot run on this CPU")
    return y
