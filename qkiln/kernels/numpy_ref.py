"""The NumPy path: the same integer block dot products as the C kernels, for machines without a compiler
and as the reference the C paths are tested against.

Every weight type is decoded to the same three arrays per 32-element block b of row n:
    codes  (N, K)  integers whose dot with the int8 activations is the block's exact integer part
    scale  (N, nb) fp32 multiplier of that integer part
    mins   (N, nb) fp32 multiplier of the activation block's integer sum, subtracted (Q4_K's dmin*m; -m for
           Q4_1/Q5_1, whose w = d*q + m; zero otherwise); (N, K/16) for Q2_K, whose mins change every 16
           elements: each multiplies the sum of its own 16 activations
so that y[m, n] = sum_b da[m, b] * (scale[n, b] * isum[m, n, b] - mins[n, b] * asum[m, b]) (with Q2_K's two
halves' terms in place of mins * asum). Sub-block scales finer than the block (Q3_K's and Q6_K's per 16) are
folded into the integer codes.

Integer parts are exact: each block's |isum| <= 32 * 127 * 4096 < 2**24, so computing it as a float32
matrix product (BLAS) loses nothing. The fp32 combination over blocks is summed in a different order than
the C kernels, so C and NumPy agree within TOLERANCE * sum_b |term_b| (see `gemm(..., with_abs=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qkiln.kernels.types import BLOCK, QK8, WType, block_bytes, int4gx8_bytes

# Relative tolerance on the absolute sum of the block terms: fp32 sums of a few hundred terms in two
# different orders differ by at most ~nb * 2**-24 of that sum; 1e-5 leaves headroom for K up to ~40k.
TOLERANCE = 1e-5

_CHUNK_ELEMS = 1 << 22  # bound on a temporary (blocks x rows x M) to keep memory flat


@dataclass(frozen=True)
class Q8Activations:
    """Activations quantized per 32-element block (llama.cpp's Q8_0 rule, clamped to [-127, 127])."""

    qs: np.ndarray  # (M, K) int8
    d: np.ndarray  # (M, K/32) float32
    sums: np.ndarray  # (M, K/32) int32

    def __post_init__(self) -> None:
        m, k = self.qs.shape
        assert self.qs.dtype == np.int8 and k % QK8 == 0
        assert self.d.shape == (m, k // QK8) and self.d.dtype == np.float32
        assert self.sums.shape == (m, k // QK8) and self.sums.dtype == np.int32


def quantize_q8(x: np.ndarray) -> Q8Activations:
    """d = amax/127, q = rint(x / d) with round-half-even in float32 — bit-identical to qk_quantize_q8."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // QK8, QK8)  # (M, nb, 32)
    amax = np.abs(xb).max(axis=-1, keepdims=True)  # (M, nb, 1)
    d = amax / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv), -127, 127).astype(np.int8)  # (M, nb, 32)
    return Q8Activations(q.reshape(m, k), d[..., 0].astype(np.float32), q.sum(axis=-1, dtype=np.int32))


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _nibbles32(raw16: np.ndarray) -> np.ndarray:
    """(..., 16) packed bytes -> (..., 32) codes: byte j holds element j (low) and j + 16 (high)."""
    return np.concatenate([raw16 & 0x0F, raw16 >> 4], axis=-1)


def _q5_codes(qh4: np.ndarray, qs16: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1 (…, 4) qh bytes (u32 LE, bit j = bit 4 of element j) and (…, 16) nibble bytes -> (…, 32) 0..31."""
    high = np.unpackbits(qh4, axis=-1, bitorder="little")  # (…, 32) bit j = element j
    return _nibbles32(qs16) | (high << 4)


def decode(wtype: WType, w: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights in `wtype`'s byte layout -> (codes (N, K) int16, scale (N, nb) f32, mins (N, nb) f32; Q2_K (N, K/16))."""
    nb = k // QK8
    raw = np.frombuffer(np.ascontiguousarray(w).data, dtype=np.uint8)
    zeros = np.zeros((n, nb), np.float32)
    codes: np.ndarray  # (N, K) int16 in every branch; the branches' intermediates differ in dtype
    v: np.ndarray
    q: np.ndarray
    ql: np.ndarray
    qh: np.ndarray
    sc: np.ndarray
    if wtype == WType.Q4_0:
        blk = raw.reshape(n, nb, 18)
        codes = _nibbles32(blk[..., 2:]).astype(np.int16) - 8
        return codes.reshape(n, k), _f16(blk[..., :2]).reshape(n, nb), zeros
    if wtype == WType.Q5_0:
        blk = raw.reshape(n, nb, 22)
        codes = _q5_codes(blk[..., 2:6], blk[..., 6:]).astype(np.int16) - 16
        return codes.reshape(n, k), _f16(blk[..., :2]).reshape(n, nb), zeros
    if wtype in (WType.Q4_1, WType.Q5_1):  # w = d*q + m: the min enters as -mins (y's term is d*isum + m*asum)
        blk = raw.reshape(n, nb, 20 if wtype == WType.Q4_1 else 24)
        codes = _nibbles32(blk[..., 4:]) if wtype == WType.Q4_1 else _q5_codes(blk[..., 4:8], blk[..., 8:])
        m = _f16(blk[..., 2:4]).reshape(n, nb)
        return codes.astype(np.int16).reshape(n, k), _f16(blk[..., :2]).reshape(n, nb), -m
    if wtype == WType.Q8_0:
        blk = raw.reshape(n, nb, 34)
        codes = blk[..., 2:].view(np.int8).astype(np.int16)
        return codes.reshape(n, k), _f16(blk[..., :2]).reshape(n, nb), zeros
    if wtype == WType.Q4_0X2:
        pairs = (n + 1) // 2
        blk = raw.reshape(pairs, nb, 36)
        d = _f16(blk[..., :4]).reshape(pairs, nb, 2).transpose(0, 2, 1).reshape(2 * pairs, nb)
        q = blk[..., 4:].reshape(pairs, nb, 2, 2, 8)  # (pair, block, half, row, 8 bytes)
        q = q.transpose(0, 3, 1, 2, 4).reshape(2 * pairs, nb, 16)
        codes = _nibbles32(q).astype(np.int16) - 8
        return codes.reshape(2 * pairs, k)[:n], d[:n], zeros
    if wtype == WType.Q4_0X8:
        groups = (n + 7) // 8
        blk = raw.reshape(groups, nb, 144)
        d = _f16(blk[..., :16]).reshape(groups, nb, 8).transpose(0, 2, 1).reshape(8 * groups, nb)
        v = blk[..., 16:].reshape(groups, nb, 2, 2, 8, 4)  # (group, block, chunk c, half h, row r, j)
        nib = np.stack([v & 0x0F, v >> 4], axis=2)  # (group, block, lo/hi, c, h, r, j): 4-group index
        codes = nib.transpose(0, 5, 1, 2, 3, 4, 6).reshape(8 * groups, nb, 32)  # k = 16*lohi + 8c + 4h + j
        codes = codes.astype(np.int16) - 8
        return codes.reshape(8 * groups, k)[:n], d[:n], zeros
    if wtype == WType.Q8_0X8:
        groups = (n + 7) // 8
        blk = raw.reshape(groups, nb, 272)
        d = _f16(blk[..., :16]).reshape(groups, nb, 8).transpose(0, 2, 1).reshape(8 * groups, nb)
        v = blk[..., 16:].view(np.int8).reshape(groups, nb, 4, 2, 8, 4)  # (group, block, c, h, r, j)
        codes = v.transpose(0, 4, 1, 2, 3, 5).reshape(8 * groups, k).astype(np.int16)  # k = 8c + 4h + j
        return codes[:n], d[:n], zeros
    if wtype == WType.Q5_0X8:  # Q4_0X8's bytes give the low 4 bits; the masks bit 4
        groups = (n + 7) // 8
        blk = raw.reshape(groups, nb, 176)
        low, d, _ = decode(WType.Q4_0X8, np.ascontiguousarray(blk[..., :144]), 8 * groups, k)
        bits = np.unpackbits(blk[..., 144:], axis=-1, bitorder="little")  # (group, block, 4 masks * 64 bits)
        bits = bits.reshape(groups, nb, 2, 2, 2, 8, 4)  # mask 2c + s, bit 4 * (8h + r) + j: (g, b, c, s, h, r, j)
        high = bits.transpose(0, 5, 1, 3, 2, 4, 6).reshape(8 * groups, k)  # k = 16s + 8c + 4h + j
        codes = low + 8 + 16 * high.astype(np.int16) - 16
        return codes[:n], d[:n], zeros
    if wtype in (WType.Q4_K, WType.Q5_K):
        nsb = k // 256
        blk = raw.reshape(n, nsb, BLOCK[wtype][1])
        d, dmin = _f16(blk[..., 0:2])[..., 0], _f16(blk[..., 2:4])[..., 0]  # (N, nsb)
        sc, mn = _q4k_scale_min(blk[..., 4:16])  # (N, nsb, 8)
        qs = blk[..., -128:].reshape(n, nsb, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, nsb, 8, 32)  # sub-block j = 2 * chunk + nibble
        if wtype == WType.Q5_K:  # bit 4 of element l of sub-block j: bit j of qh[l]
            qh = blk[..., 16:48].reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            q = q | ((qh & 1) << 4)
        codes = q.astype(np.int16).reshape(n, k)
        scale = (d[..., None] * sc.astype(np.float32)).reshape(n, nb)
        mins = (dmin[..., None] * mn.astype(np.float32)).reshape(n, nb)
        return codes, scale.astype(np.float32), mins.astype(np.float32)
    if wtype == WType.Q2_K:  # w = d*sc*q - dmin*m per 16: sc folded into the codes, the mins per 16
        nsb = k // 256
        blk = raw.reshape(n, nsb, 84)
        sc, mn = (blk[..., :16] & 0x0F).astype(np.int16), blk[..., :16] >> 4  # (N, nsb, 16)
        codes = (_k_low2(blk[..., 16:80]).reshape(n, nsb, 16, 16) * sc[..., None]).reshape(n, k)
        d, dmin = _f16(blk[..., 80:82])[..., 0], _f16(blk[..., 82:84])[..., 0]  # (N, nsb)
        mins = (dmin[..., None] * mn.astype(np.float32)).reshape(n, nsb * 16)
        return codes, np.repeat(d, 8, axis=1).astype(np.float32), mins.astype(np.float32)
    if wtype == WType.Q3_K:  # w = d*sc*(q-4) per 16: the signed sub-block scale folded into the codes
        nsb = k // 256
        blk = raw.reshape(n, nsb, 110)
        hm = (blk[..., :32].reshape(n, nsb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1  # bit 2
        q = (_k_low2(blk[..., 32:96]) | (hm.reshape(n, nsb, 256) << 2)).astype(np.int16) - 4
        codes = (q.reshape(n, nsb, 16, 16) * _q3k_scales(blk[..., 96:108])[..., None]).reshape(n, k)
        d = _f16(blk[..., 108:110])[..., 0]  # (N, nsb)
        return codes, np.repeat(d, 8, axis=1).astype(np.float32), zeros
    if wtype == WType.Q6_K:
        nsb = k // 256
        blk = raw.reshape(n, nsb, 210)
        ql = blk[..., :128].reshape(n, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
        ql = (ql & 0x0F).reshape(n, nsb, 2, 4, 32)
        qh = blk[..., 128:192].reshape(n, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
        qh = qh & 0x03  # (N, nsb, 2, 4, 32)
        q = (ql | (qh << 4)).astype(np.int16).reshape(n, nsb, 16, 16) - 32
        sc = blk[..., 192:208].view(np.int8).astype(np.int16)  # (N, nsb, 16)
        codes = (q * sc[..., None]).reshape(n, k)  # the 16-element sub-scale folded into the integer code
        d = _f16(blk[..., 208:210])[..., 0]  # (N, nsb)
        scale = np.repeat(d, 8, axis=1).astype(np.float32)
        return codes, scale, zeros
    raise ValueError(f"decode: unsupported weight type {wtype!r}")


def _q4k_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, 12) packed bytes -> 6-bit scales and mins (…, 8)."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def _k_low2(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's (…, 64) qs bytes -> (…, 256) low two bits: element 128h + 32t + l at bits 2t of byte 32h + l."""
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    return ((qs.reshape(*qs.shape[:-1], 2, 1, 32) >> shifts) & 3).reshape(*qs.shape[:-1], 256)


def _q3k_scales(s: np.ndarray) -> np.ndarray:
    """Q3_K's (…, 12) scale bytes -> (…, 16) int16 in -32..31: low nibbles in bytes 0-7 (j < 8 low, else high),
    bits 4-5 of scale j at bits 2*(j // 4) of byte 8 + j % 4."""
    low = np.concatenate([s[..., :8] & 0x0F, s[..., :8] >> 4], axis=-1)  # (…, 16)
    hi = (s[..., None, 8:12] >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3  # (…, j // 4, j % 4)
    return (low | (hi.reshape(*s.shape[:-1], 16) << 4)).astype(np.int16) - 32


def decode_int4g(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INT4 with zero points: (N, K/2) bytes in Q4_0 nibble order, scales/zeros (N, K/group)."""
    nb = k // QK8
    q = _nibbles32(np.asarray(codes, np.uint8).reshape(n, nb, 16)).astype(np.int16)  # (N, nb, 32)
    per = group // QK8
    z = np.repeat(np.asarray(zeros, np.int16).reshape(n, k // group), per, axis=1)  # (N, nb)
    s = np.repeat(np.asarray(scales, np.float32).reshape(n, k // group), per, axis=1)  # (N, nb)
    return (q - z[..., None]).reshape(n, k), s.astype(np.float32), np.zeros((n, nb), np.float32)


def decode_int4gx8(w: np.ndarray, group: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """INT4GX8 bytes (qk_repack_int4gx8) -> the same (codes - zero, scale, mins) as decode_int4g."""
    nb, ng, per = k // QK8, k // group, group // QK8
    groups = (n + 7) // 8
    raw = np.frombuffer(np.ascontiguousarray(w).data, np.uint8).reshape(groups, ng, 40 + per * 128)
    s = np.ascontiguousarray(raw[..., :32]).view("<f4").reshape(groups, ng, 8).transpose(0, 2, 1)  # (G, 8, ng)
    z = raw[..., 32:40].transpose(0, 2, 1)  # (G, 8, ng)
    v = raw[..., 40:].reshape(groups, ng, per, 2, 2, 8, 4)  # (G, g, i, chunk c, half h, row r, j)
    nib = np.stack([v & 0x0F, v >> 4], axis=3)  # (G, g, i, lo/hi, c, h, r, j): k = 16*lohi + 8c + 4h + j
    q = nib.transpose(0, 6, 1, 2, 3, 4, 5, 7).reshape(8 * groups, nb, 32).astype(np.int16)  # (Npad, nb, 32)
    zb = np.repeat(z.reshape(8 * groups, ng).astype(np.int16), per, axis=1)  # (Npad, nb)
    sb = np.repeat(s.reshape(8 * groups, ng).astype(np.float32), per, axis=1)  # (Npad, nb)
    codes = (q - zb[..., None]).reshape(8 * groups, k)
    return codes[:n], sb[:n], np.zeros((n, nb), np.float32)


def repack_int4gx8(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int
                   ) -> np.ndarray:
    """INT4 (codes (N, K/2), scales f32 / zeros u8 (N, K/group)) -> INT4GX8 bytes, as qk_repack_int4gx8."""
    nb, ng, per = k // QK8, k // group, group // QK8
    groups = (n + 7) // 8
    q = np.zeros((8 * groups, nb, 32), np.uint8)
    q[:n] = _nibbles32(np.asarray(codes, np.uint8).reshape(n, nb, 16))
    q = q.reshape(groups, 8, nb, 2, 2, 2, 4)  # (G, r, b, lohi, c, h, j)
    v = q[..., 0, :, :, :] | (q[..., 1, :, :, :] << 4)  # (G, r, b, c, h, j)
    v = v.transpose(0, 2, 3, 4, 1, 5).reshape(groups, ng, per * 128)  # (G, g, [i, c, h, r, j])
    s = np.zeros((8 * groups, ng), "<f4")
    s[:n] = np.asarray(scales, np.float32).reshape(n, ng)
    z = np.zeros((8 * groups, ng), np.uint8)
    z[:n] = np.asarray(zeros, np.uint8).reshape(n, ng)
    s8 = s.reshape(groups, 8, ng).transpose(0, 2, 1).copy().view(np.uint8)  # (G, g, 32)
    z8 = z.reshape(groups, 8, ng).transpose(0, 2, 1)  # (G, g, 8)
    out = np.concatenate([s8, z8, v], axis=-1).reshape(-1)
    assert out.size == int4gx8_bytes(n, k, group)
    return out


def gemm_int4gx8(w: np.ndarray, group: int, n: int, k: int, act: Q8Activations, *, with_abs: bool = False):
    assert w.size == int4gx8_bytes(n, k, group), "weight byte count does not match the shape"
    return combine(*decode_int4gx8(w, group, n, k), act, with_abs=with_abs)


def block_isums(codes: np.ndarray, act: Q8Activations) -> np.ndarray:
    """Exact per-block integer dot products, (M, N, nb) int32 (float32 BLAS, exact below 2**24)."""
    n, k = codes.shape
    m = act.qs.shape[0]
    nb = k // QK8
    cw = codes.reshape(n, nb, QK8).transpose(1, 0, 2).astype(np.float32)  # (nb, N, 32)
    ca = act.qs.reshape(m, nb, QK8).transpose(1, 2, 0).astype(np.float32)  # (nb, 32, M)
    return np.matmul(cw, ca).transpose(2, 1, 0).astype(np.int32)


def combine(codes: np.ndarray, scale: np.ndarray, mins: np.ndarray, act: Q8Activations, *,
            with_abs: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """y (M, N) f32 from decoded weights; with_abs also returns sum_b |term_b| for the tolerance."""
    n, k = codes.shape
    m = act.qs.shape[0]
    nb = k // QK8
    y = np.empty((m, n), np.float32)
    yabs = np.empty((m, n), np.float32) if with_abs else None
    ca = act.qs.reshape(m, nb, QK8).transpose(1, 2, 0).astype(np.float32)  # (nb, 32, M)
    g = mins.shape[1] // nb  # mins per block: 1, or 2 (Q2_K: per 16 elements)
    asum = act.sums if g == 1 else act.qs.reshape(m, nb * g, QK8 // g).sum(axis=-1, dtype=np.int32)  # (M, nb*g)
    asum_t = asum.astype(np.float32).reshape(m, nb, g).transpose(1, 2, 0)  # (nb, g, M) exact integers
    rows = max(1, _CHUNK_ELEMS // max(1, nb * max(m, QK8)))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        cw = codes[r0:r1].reshape(r1 - r0, nb, QK8).transpose(1, 0, 2).astype(np.float32)  # (nb, R, 32)
        isum = np.matmul(cw, ca)  # (nb, R, M) exact integers
        min_terms = np.matmul(mins[r0:r1].reshape(r1 - r0, nb, g).transpose(1, 0, 2), asum_t)  # (nb, R, M)
        terms = scale[r0:r1].T[:, :, None] * isum - min_terms
        terms *= act.d.T[:, None, :]  # (nb, R, M)
        y[:, r0:r1] = terms.sum(axis=0, dtype=np.float32).T
        if yabs is not None:
            yabs[:, r0:r1] = np.abs(terms).sum(axis=0, dtype=np.float32).T
    if yabs is not None:
        return y, yabs
    return y


def gemm(wtype: WType, w: np.ndarray, n: int, k: int, act: Q8Activations, *, with_abs: bool = False):
    """y (M, N) = W x on ggml-layout bytes `w` (see qkiln/kernels/include/qkiln_kernels.h)."""
    assert w.size == block_bytes(wtype, n, k), "weight byte count does not match the shape"
    return combine(*decode(wtype, w, n, k), act, with_abs=with_abs)


def gemm_int4g(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int,
               act: Q8Activations, *, with_abs: bool = False):
    return combine(*decode_int4g(codes, scales, zeros, group, n, k), act, with_abs=with_abs)


def repack_q4_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q4_0 (N, K) bytes -> the 8-row-group layout the AVX-512 VNNI kernel reads (qk_repack_q4_0x8)."""
    nb = k // QK8
    groups = (n + 7) // 8
    blk = np.zeros((8 * groups, nb, 18), np.uint8)
    blk[:n] = np.frombuffer(np.ascontiguousarray(w).data, np.uint8).reshape(n, nb, 18)
    q = _nibbles32(blk[..., 2:]).reshape(groups, 8, nb, 2, 2, 2, 4)  # (g, r, b, lohi, c, h, j)
    v = q[..., 0, :, :, :] | (q[..., 1, :, :, :] << 4)  # (g, r, b, c, h, j)
    v = v.transpose(0, 2, 3, 4, 1, 5).reshape(groups, nb, 128)  # (g, b, c, h, r, j)
    d = blk[..., :2].reshape(groups, 8, nb, 2).transpose(0, 2, 1, 3).reshape(groups, nb, 16)
    return np.ascontiguousarray(np.concatenate([d, v], axis=-1)).reshape(-1)


def repack_q8_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q8_0 (N, K) bytes -> the 8-row-group layout of qk_repack_q8_0x8."""
    nb = k // QK8
    groups = (n + 7) // 8
    blk = np.zeros((8 * groups, nb, 34), np.uint8)
    blk[:n] = np.frombuffer(np.ascontiguousarray(w).data, np.uint8).reshape(n, nb, 34)
    q = blk[..., 2:].reshape(groups, 8, nb, 4, 2, 4)  # (g, r, b, c, h, j)
    v = q.transpose(0, 2, 3, 4, 1, 5).reshape(groups, nb, 256)
    d = blk[..., :2].reshape(groups, 8, nb, 2).transpose(0, 2, 1, 3).reshape(groups, nb, 16)
    return np.ascontiguousarray(np.concatenate([d, v], axis=-1)).reshape(-1)


def repack_q5_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q5_0 (N, K) bytes -> the 8-row-group layout of qk_repack_q5_0x8: Q4_0X8 of the low 4 bits, then the masks."""
    nb = k // QK8
    groups = (n + 7) // 8
    blk = np.zeros((8 * groups, nb, 22), np.uint8)
    blk[:n] = np.frombuffer(np.ascontiguousarray(w).data, np.uint8).reshape(n, nb, 22)
    low = repack_q4_0x8(np.concatenate([blk[..., :2], blk[..., 6:]], axis=-1), 8 * groups, k).reshape(groups, nb, 144)
    high = np.unpackbits(blk[..., 2:6], axis=-1, bitorder="little")  # (rows, block, 32): bit 4 of element k
    high = high.reshape(groups, 8, nb, 2, 2, 2, 4).transpose(0, 2, 4, 3, 5, 1, 6)  # k = 16s + 8c + 4h + j -> (g, b, c, s, h, r, j)
    masks = np.packbits(high.reshape(groups, nb, 4, 64), axis=-1, bitorder="little").reshape(groups, nb, 32)
    return np.ascontiguousarray(np.concatenate([low, masks], axis=-1)).reshape(-1)


def repack_q4_0x2(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q4_0 (N, K) bytes -> the interleaved row-pair layout the i8mm kernels read (qk_repack_q4_0x2)."""
    nb = k // QK8
    blk = np.frombuffer(np.ascontiguousarray(w).data, np.uint8).reshape(n, nb, 18)
    if n % 2:
        blk = np.concatenate([blk, np.zeros((1, nb, 18), np.uint8)], axis=0)
    pr = blk.reshape(-1, 2, nb, 18).transpose(0, 2, 1, 3)  # (pairs, nb, 2, 18)
    d = pr[..., :2].reshape(-1, nb, 4)
    q = pr[..., 2:].reshape(-1, nb, 2, 2, 8).transpose(0, 1, 3, 2, 4).reshape(-1, nb, 32)
    return np.ascontiguousarray(np.concatenate([d, q], axis=-1)).reshape(-1)
