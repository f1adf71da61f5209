"""NumPy definitions of the element-wise ops and attention that the C kernels replace.

The reference each kernel is tested against and the path taken without the library (or with
QKILN_KERNEL=numpy): RMSNorm, SiLU·up, rotate-half RoPE, grouped-query causal attention, float32, the same
math as transformers' eager Llama. They live with the kernels (the runtime calls the kernels, never these
directly), so the kernels need nothing from the layers above them.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

# Attention scores are computed for blocks of queries so their buffer stays under this many floats
# (and keys beyond a block's last query are skipped, saving part of the causal triangle). About
# _QUERY_BLOCKS blocks per call (not smaller than _MIN_QUERY_BLOCK): 4 blocks skip 3/8 of the scores
# (8 would skip 7/16) with half the BLAS calls, which matters when OpenBLAS's threads share busy cores.
_SCORE_BUDGET = 8 * 1024 * 1024
_QUERY_BLOCKS = 4
_MIN_QUERY_BLOCK = 64


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (t, hidden) -> x * rsqrt(mean(x^2) + eps) * weight, float32, a new array.

    The NumPy definition: `kernels.elementwise.rms_norm` (C, same answers within its stated tolerance)
    falls back to this; so do `silu_mul` and `apply_rope`."""
    ms = np.einsum("ti,ti->t", x, x) / np.float32(x.shape[-1])  # (t,)
    r = (np.float32(1.0) / np.sqrt(ms + np.float32(eps))).astype(np.float32)  # (t,)
    out = x * r[:, None]  # (t, hidden)
    out *= weight
    return out


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, (t, inter) float32; exp overflow gives 0 as it should."""
    out = np.negative(gate)
    with np.errstate(over="ignore"):
        np.exp(out, out=out)
    out += np.float32(1.0)
    np.divide(gate, out, out=out)
    out *= up
    return out


def causal_attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Grouped-query causal attention; returns (b * s, heads * head_dim) float32.

    q: (b, s, heads, d) rotated queries; keys, values: (b, kv_heads, t, d) with t >= s, the queries
    being the last s of the t positions (t - s earlier positions come from a KV cache).
    Query head h reads kv head h // n_rep (transformers' repeat_kv order).
    """
    b, s, n_heads, d = q.shape
    kv_heads, t = keys.shape[1], keys.shape[2]
    assert t >= s, (t, s)
    offset = t - s  # index of the first query among the keys
    n_rep = n_heads // kv_heads
    qg = q.reshape(b, s, kv_heads, n_rep, d).transpose(0, 2, 3, 1, 4)  # (b, kvh, n_rep, s, d) view
    out = np.empty((b, s, kv_heads, n_rep, d), np.float32)
    block = max(_MIN_QUERY_BLOCK, -(-s // _QUERY_BLOCKS))
    block = max(1, min(block, _SCORE_BUDGET // max(1, b * n_heads * t)))
    scale = np.float32(1.0 / math.sqrt(d))
    for a in range(0, s, block):  # blocks of queries, not tokens one by one
        c = min(s, a + block)
        n, tc = c - a, offset + c  # queries in block; keys they can see
        qc = (qg[:, :, :, a:c] * scale).reshape(b, kv_heads, n_rep * n, d)  # (b, kvh, n_rep*n, d)
        scores = np.matmul(qc, keys[:, :, :tc].swapaxes(-1, -2))  # (b, kvh, n_rep*n, tc)
        if n > 1:  # query i of the block sees keys up to offset + a + i
            sv = scores.reshape(b, kv_heads, n_rep, n, tc)
            sv[..., offset + a :] += _upper_mask(n)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        denom = scores.sum(axis=-1, keepdims=True)  # (b, kvh, n_rep*n, 1)
        oc = np.matmul(scores, values[:, :, :tc])  # (b, kvh, n_rep*n, d)
        oc /= denom
        out[:, a:c] = oc.reshape(b, kv_heads, n_rep, n, d).transpose(0, 3, 1, 2, 4)
    return out.reshape(b * s, n_heads * d)


_MASKS: dict[int, np.ndarray] = {}


def _upper_mask(n: int) -> np.ndarray:
    """(n, n) float32: -inf strictly above the diagonal, 0 elsewhere (cached per size)."""
    m = _MASKS.get(n)
    if m is None:
        m = np.triu(np.full((n, n), -np.inf, np.float32), k=1)
        _MASKS[n] = m
    return m


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate (b, s, heads, head_dim) by position: `x * cos + rotate_half(x) * sin`, a new array.

    cos/sin are (s, head_dim // 2); transformers duplicates them to head_dim, so the first half of each
    head pairs with the second half: out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin.
    """
    half = x.shape[-1] // 2
    c = cos[None, :, None, :]  # (1, s, 1, half)
    s = sin[None, :, None, :]  # (1, s, 1, half)
    x1, x2 = x[..., :half], x[..., half:]
    out = np.empty_like(x)
    o1, o2 = out[..., :half], out[..., half:]
    np.multiply(x1, c, out=o1)
    o1 -= x2 * s
    np.multiply(x2, c, out=o2)
    o2 += x1 * s
    return out


# bfloat16: the rule every kernel rounds by (AMX products' inputs, activations stored in bfloat16)
BF16 = np.dtype(ml_dtypes.bfloat16)  # activations stored already rounded (the products' inputs as they are)


def widen(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A bfloat16 array's exact float32 values, its bits shifted into a float32's upper half, into the float32
    `out` of x's shape when given (a reader widens into its result in place); any other array as it is."""
    if x.dtype != BF16:
        return x
    bits = np.empty(x.shape, np.uint32) if out is None else out.view(np.uint32)
    np.left_shift(x.view(np.uint16), np.uint32(16), out=bits, dtype=np.uint32)
    return bits.view(np.float32)


def round_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bf16 value (as float32) by the kernels' rule; same shape.

    ml_dtypes' cast is the round-to-nearest-even (one C pass); float32 denormals and NaNs are then set by
    the rule (flushed before rounding, so a denormal that would round up to the smallest normal is zero)."""
    x = np.ascontiguousarray(a, dtype=np.float32)
    with np.errstate(invalid="ignore"):  # NaN casts are fixed below
        b = x.astype(ml_dtypes.bfloat16).view(np.uint16)  # (...) bf16 bits
    tiny = np.abs(x) < np.float32(1.1754944e-38)  # zero or denormal (NaN compares False)
    b[tiny] = (x[tiny].view(np.uint32) >> np.uint32(16)).astype(np.uint16) & np.uint16(0x8000)
    nan = np.isnan(x)
    b[nan] = ((x[nan].view(np.uint32) >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return widen(b.view(BF16))


def store_rounded(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 values into a bfloat16 `out`, rounded by the kernels' rule (`round_bf16`); returns out."""
    bits = (round_bf16(values).view(np.uint32) >> np.uint32(16)).astype(np.uint16)  # the upper halves: NaN payloads
    out.view(np.uint16)[...] = bits  # kept (a cast to bfloat16 would make every NaN 0x7fc0)
    return out
