"""Random and edge-case weights in every kernel layout, shared by the native and qemu kernel tests."""

from __future__ import annotations

import numpy as np

from qkiln.kernels.numpy_ref import Q8Activations
from qkiln.kernels.types import BLOCK, WType, block_bytes


def f16_bytes(values: np.ndarray) -> np.ndarray:
    """(…,) float -> (…, 2) little-endian fp16 bytes."""
    return np.asarray(values, np.float16).astype("<f2").view(np.uint8).reshape(*np.shape(values), 2)


def random_weights(wtype: WType, n: int, k: int, rng: np.random.Generator, *, unit_scales: bool = False,
                   codes: str = "random") -> np.ndarray:
    """Valid blocks with random codes; fp16 scales random (or exactly 1.0), codes random / all-min / all-max."""
    if wtype in (WType.Q8_0X8, WType.Q5_0X8):
        from qkiln.kernels.numpy_ref import repack_q5_0x8, repack_q8_0x8

        plain = WType.Q8_0 if wtype == WType.Q8_0X8 else WType.Q5_0
        repack = repack_q8_0x8 if wtype == WType.Q8_0X8 else repack_q5_0x8
        return repack(random_weights(plain, n, k, rng, unit_scales=unit_scales, codes=codes), n, k)
    if wtype in (WType.Q4_0X2, WType.Q4_0X8):
        from qkiln.kernels.numpy_ref import repack_q4_0x2, repack_q4_0x8

        base = random_weights(WType.Q4_0, n, k, rng, unit_scales=unit_scales, codes=codes)
        return (repack_q4_0x2 if wtype == WType.Q4_0X2 else repack_q4_0x8)(base, n, k)
    nbytes = block_bytes(wtype, n, k)
    if codes == "random":
        raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    else:
        raw = np.full(nbytes, 0x00 if codes == "min" else 0xFF, np.uint8)
    if wtype in (WType.Q4_0, WType.Q8_0):
        bsz = 18 if wtype == WType.Q4_0 else 34
        blk = raw.reshape(-1, bsz)
        d = np.ones(len(blk)) if unit_scales else rng.uniform(-0.05, 0.05, len(blk))
        blk[:, :2] = f16_bytes(d)
        if wtype == WType.Q8_0 and codes == "min":
            blk[:, 2:] = 0x80  # -128: a legal weight code (only activations must avoid it)
    elif wtype in (WType.Q5_0, WType.Q4_1, WType.Q5_1):
        blk = raw.reshape(-1, {WType.Q5_0: 22, WType.Q4_1: 20, WType.Q5_1: 24}[wtype])
        lo = -0.05 if wtype == WType.Q5_0 else 0.0  # Q5_0's d takes the sign of the block's extreme
        blk[:, :2] = f16_bytes(np.ones(len(blk)) if unit_scales else rng.uniform(lo, 0.05 if lo else 0.01, len(blk)))
        if wtype != WType.Q5_0:  # m: about the block's minimum, -16 d (-8 d for Q4_1) with noise, or exactly 1.0
            lo = -0.16 if wtype == WType.Q5_1 else -0.08
            blk[:, 2:4] = f16_bytes(np.ones(len(blk)) if unit_scales else rng.uniform(lo, 0.01, len(blk)))
    elif wtype in (WType.Q2_K, WType.Q4_K, WType.Q5_K):  # d, dmin: at the end of Q2_K's block, else first
        blk = raw.reshape(-1, BLOCK[wtype][1])
        at = 80 if wtype == WType.Q2_K else 0
        for i in (at, at + 2):
            blk[:, i:i + 2] = f16_bytes(np.ones(len(blk)) if unit_scales else rng.uniform(0, 0.01, len(blk)))
    elif wtype in (WType.Q3_K, WType.Q6_K):  # d ends the block
        blk = raw.reshape(-1, BLOCK[wtype][1])
        blk[:, -2:] = f16_bytes(np.ones(len(blk)) if unit_scales else rng.uniform(-0.01, 0.01, len(blk)))
    return raw


def random_int4g(n: int, k: int, group: int, rng: np.random.Generator, *, unit_scales: bool = False):
    codes = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    scales = np.ones((n, k // group), np.float32) if unit_scales else rng.uniform(0.001, 0.1, (n, k // group)).astype(np.float32)
    zeros = rng.integers(0, 16, (n, k // group), dtype=np.uint8)
    return codes, scales, zeros


def unit_activations(m: int, k: int, rng: np.random.Generator, *, extreme: bool = False) -> Q8Activations:
    """int8 activations in [-127, 127] with scale exactly 1.0, so every product is an exact integer in fp32."""
    if extreme:
        qs = np.where(rng.integers(0, 2, (m, k)) == 1, 127, -127).astype(np.int8)
    else:
        qs = rng.integers(-127, 128, (m, k), dtype=np.int8)
    d = np.ones((m, k // 32), np.float32)
    return Q8Activations(qs, d, qs.reshape(m, -1, 32).sum(axis=-1, dtype=np.int32))
