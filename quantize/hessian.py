"""GPTQ's Hessian of a linear layer's output error: H = 2 XᵀX / n over the calibration tokens.

For a linear y = W x and a weight change E, the summed squared output error over tokens is
tr(E XᵀX Eᵀ) — so H (up to the factor 2/n) is all GPTQ and AWQ's searches need to know about the
calibration activations, and it is (in, in) whatever the number of tokens.

Precision: each chunk's XᵀX is one float32 BLAS product (the hot part: n·in² multiply-adds per
linear input, where float64 would be 2x slower), and the running mean is kept in float64 so that
rescaling and adding hundreds of chunks does not drift; a chunk of a few thousand tokens has a float32
relative error around 1e-6, far below the dampening GPTQ adds (1% of the mean diagonal).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qkiln.kernels.blas import one_blas_thread

# Tokens per float32 XᵀX product: bounds the temporary copy of x and keeps the float32 sums short.
CHUNK_TOKENS = 8192


def empty_hessian(n_in: int) -> tuple[np.ndarray, int]:
    """A fresh (H, n_seen): (in, in) float64 zeros and no tokens seen."""
    return np.zeros((n_in, n_in), dtype=np.float64), 0


def gram_f32(x2d: np.ndarray) -> np.ndarray:
    """xᵀx (in, in) float32 of a (tokens, in) float32 chunk: one BLAS product (syrk for this pattern), on one
    thread — a threaded syrk sums in an order that depends on the thread count (the tied head's Hessian gave
    other bytes on 2 threads than on 1 on an AVX2 host)."""
    with one_blas_thread():
        return x2d.T @ x2d


class HessianSum:
    """Running H = 2XᵀX/n over token chunks, the chunk products made by `gram` (float32 BLAS by default,
    bfloat16 AMX in calibration) and summed in float64."""

    def __init__(self, n_in: int, gram: Callable[[np.ndarray], np.ndarray] = gram_f32):
        self.sum = np.zeros((n_in, n_in), dtype=np.float64)  # (in, in) Σ xᵀx
        self.n = 0
        self.gram = gram

    def add(self, x2d: np.ndarray) -> None:
        """Fold tokens x2d (tokens, in) float32 in, CHUNK_TOKENS at a time."""
        for start in range(0, x2d.shape[0], CHUNK_TOKENS):
            xc = np.ascontiguousarray(x2d[start : start + CHUNK_TOKENS], dtype=np.float32)  # (chunk, in)
            self.sum += self.gram(xc)
        self.n += x2d.shape[0]

    def add_gram(self, g: np.ndarray, n_tokens: int) -> None:
        """Fold in a chunk's xᵀx (in, in) made elsewhere, over n_tokens tokens."""
        self.sum += g
        self.n += n_tokens

    def mean(self) -> np.ndarray:
        """H = 2 Σxᵀx / n, (in, in) float64 (zeros before any token)."""
        return self.sum * (2.0 / max(self.n, 1))


def accumulate_hessian(h: np.ndarray, n_seen: int, x2d: np.ndarray) -> tuple[np.ndarray, int]:
    """Fold the tokens `x2d` (tokens, in) into the running mean H = 2 XᵀX / n; returns (H', n').

    Pure: `h` (in, in) float64 is not modified. Tokens are rows; any float dtype is accepted and
    multiplied in float32.
    """
    x2d = np.asarray(x2d)
    assert x2d.ndim == 2 and h.shape == (x2d.shape[1], x2d.shape[1]), (h.shape, x2d.shape)
    m = x2d.shape[0]
    if m == 0:
        return h.copy(), n_seen
    chunks = HessianSum(h.shape[0])
    chunks.add(x2d)
    xtx = chunks.sum  # (in, in)
    n_new = n_seen + m
    h_new = h * (n_seen / n_new) + xtx * (2.0 / n_new)
    return h_new, n_new


def mean_hessian(g: np.ndarray, n_tokens: int) -> np.ndarray:
    """H = 2 Σxᵀx / n from a float32 Gram `g` (k, k) over n tokens, IN PLACE in `g` (returned): each entry
    scaled in float64 and rounded once to float32 — the values `HessianSum.mean()` would give in float32,
    without its two float64 (k, k) arrays (3.3 GB at k = 14336, an 8B model's down_proj input). A float64
    Gram (the float32 engine's `HessianSum`) gives a new float32 array of the same values."""
    factor = 2.0 / max(n_tokens, 1)
    if g.dtype == np.float64:
        return (g * factor).astype(np.float32)
    for r0 in range(0, g.shape[0], 256):
        block = g[r0 : r0 + 256].astype(np.float64)
        block *= factor
        g[r0 : r0 + 256] = block
    return g
