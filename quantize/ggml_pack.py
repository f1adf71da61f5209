"""Pack a `QuantizedTensor` on a llama.cpp grid into ggml block bytes, exactly as ggml lays them out.

`pack_blocks(qt)` returns uint8 (rows, cols / block * type_size) — the tensor data a GGUF writer
stores for that ggml type; `gguf.quants.dequantize` of it equals `qt.dequantize()` bit for bit.
`unpack_blocks(data, scheme_name, shape)` is the exact inverse (a GGUF's blocks as a QuantizedTensor,
so re-packing them loses nothing). Little-endian fp16, as GGUF is.

Layouts (ggml-common.h):
  Q8_0  d fp16 | qs int8[32]
  Q4_0  d fp16 | qs[16]: byte j = q[j] | q[j+16] << 4
  Q4_1  d, m fp16 | qs[16]
  Q5_0  d fp16 | qh u32 (bit j = bit 4 of q[j]) | qs[16] (low nibbles as Q4_0)
  Q5_1  d, m fp16 | qh | qs
  Q4_K  d, dmin fp16 | scales[12] (8 6-bit scales + 8 6-bit mins) | qs[128]: 32-byte chunk c holds
        sub-block 2c in the low nibbles and 2c+1 in the high nibbles
  Q5_K  as Q4_K, then qh[32] (bit j of byte l = bit 4 of element 32j + l) before qs[128]
  Q6_K  ql[128] | qh[64] | scales int8[16] | d fp16
  Q2_K  scales[16] (scale low nibble, min high nibble) | qs[64]: element 128h + 32s + l at bits 2s of
        byte 32h + l | d, dmin fp16
  Q3_K  hmask[32] (bit t of byte l = bit 2 of element 32t + l) | qs[64] (low 2 bits, as Q2_K) |
        scales[12] (16 six-bit values sc + 32: low nibbles in bytes 0-7, high 2 bits in bytes 8-11) | d fp16
"""

from __future__ import annotations

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.ggml_types import GGML_TYPES, QK_K, ggml_type_name
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.tensor import QuantizedTensor


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    """(rows, nb) float16 -> (rows, nb, 2) uint8, little-endian."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(..., 2, n) codes -> (..., n) bytes: first half low nibble, second half high nibble."""
    return (q[..., 0, :] & 0x0F) | (q[..., 1, :] << 4)


def _pack_legacy(qt: QuantizedTensor, kind: str) -> np.ndarray:
    rows, cols = qt.shape
    nb = cols // 32
    q = qt.codes.reshape(rows, nb, 32)
    parts = [_fp16_bytes(qt.params["d"])]
    if kind in ("q4_1", "q5_1"):
        parts.append(_fp16_bytes(qt.params["m"]))
    if kind == "q8_0":
        parts.append(q ^ np.uint8(0x80))  # offset binary -> two's complement int8
    else:
        if kind in ("q5_0", "q5_1"):
            qh = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")  # (rows, nb, 4) = u32 LE
            parts.append(qh)
        parts.append(_nibbles(q.reshape(rows, nb, 2, 16)))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_kscales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 scale bytes from 8 six-bit scales and 8 six-bit mins, (..., 8) each -> (..., 12)."""
    lo_sc, hi_sc = sc[..., :4], sc[..., 4:]
    lo_mn, hi_mn = mn[..., :4], mn[..., 4:]
    b0 = (lo_sc & 0x3F) | ((hi_sc >> 4) << 6)
    b1 = (lo_mn & 0x3F) | ((hi_mn >> 4) << 6)
    b2 = (hi_sc & 0x0F) | ((hi_mn & 0x0F) << 4)
    return np.concatenate([b0, b1, b2], axis=-1).astype(np.uint8)


def pack_q3scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes from 16 signed scales (..., 16) int8 in -32..31 (stored as sc + 32)."""
    u = (sc.astype(np.int16) + 32).astype(np.uint8)  # (..., 16) six-bit
    low = (u[..., :8] & 0x0F) | ((u[..., 8:] & 0x0F) << 4)
    hi = (u >> 4).reshape(*u.shape[:-1], 4, 4)  # (..., j // 4, j % 4)
    high = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    return np.concatenate([low, high], axis=-1).astype(np.uint8)


def unpack_q3scales(b: np.ndarray) -> np.ndarray:
    """(..., 12) bytes -> (..., 16) int8 scales in -32..31."""
    low = np.concatenate([b[..., :8] & 0x0F, b[..., :8] >> 4], axis=-1)  # (..., 16)
    hi = (b[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3  # (..., j % 4, j // 4)
    hi = np.swapaxes(hi, -1, -2).reshape(*b.shape[:-1], 16)
    return ((low | (hi << 4)).astype(np.int16) - 32).astype(np.int8)


def _pack_k(qt: QuantizedTensor, kind: str) -> np.ndarray:
    rows, cols = qt.shape
    nb = cols // QK_K
    p = qt.params
    q = qt.codes.reshape(rows, nb, QK_K)
    if kind in ("q2_k", "q3_k"):
        low = (q & 3).reshape(rows, nb, 2, 4, 32)  # (half, shift, l)
        qs = (low[..., 0, :] | (low[..., 1, :] << 2) | (low[..., 2, :] << 4) | (low[..., 3, :] << 6)).reshape(
            rows, nb, 64
        )
        if kind == "q2_k":
            sc = p["scales"].reshape(rows, nb, 16) | (p["mins"].reshape(rows, nb, 16) << 4)
            parts = [sc.astype(np.uint8), qs, _fp16_bytes(p["d"]), _fp16_bytes(p["dmin"])]
        else:
            hbit = ((q >> 2) & 1).reshape(rows, nb, 8, 32)
            hmask = np.zeros((rows, nb, 32), np.uint8)
            for t in range(8):  # 8 bit planes, each vectorized over all blocks
                hmask |= hbit[:, :, t, :] << t
            parts = [hmask, qs, pack_q3scales(p["scales"].reshape(rows, nb, 16)), _fp16_bytes(p["d"])]
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    if kind == "q6_k":
        ql = _nibbles((q & 0x0F).reshape(rows, nb, 2, 2, 64)).reshape(rows, nb, 128)
        hi = (q >> 4).reshape(rows, nb, 2, 4, 32)  # (half, quarter, l)
        qh = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
        scales = p["scales"].reshape(rows, nb, 16).view(np.uint8)
        parts = [ql, qh.reshape(rows, nb, 64), scales, _fp16_bytes(p["d"])]
    else:
        scales = pack_kscales(p["scales"].reshape(rows, nb, 8), p["mins"].reshape(rows, nb, 8))
        parts = [_fp16_bytes(p["d"]), _fp16_bytes(p["dmin"]), scales]
        if kind == "q5_k":
            bits = ((q >> 4) & 1).reshape(rows, nb, 8, 32)
            qh = np.zeros((rows, nb, 32), np.uint8)
            for j in range(8):  # 8 bit planes, each vectorized over all blocks
                qh |= bits[:, :, j, :] << j
            parts.append(qh)
        parts.append(_nibbles((q & 0x0F).reshape(rows, nb, 4, 2, 32)).reshape(rows, nb, 128))
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


def pack_blocks(qt: QuantizedTensor) -> np.ndarray:
    """ggml block bytes (rows, bytes_per_row) uint8 for `qt` (scheme q8_0, q4_0, ..., q6_k)."""
    kind = qt.scheme.name
    ggml_type_name(kind)
    if kind.endswith("_k"):
        return _pack_k(qt, kind)
    return _pack_legacy(qt, kind)


def _fp16_from(b: np.ndarray) -> np.ndarray:
    """(..., 2) uint8 little-endian -> (...) float16."""
    return np.ascontiguousarray(b).view("<f2")[..., 0].astype(np.float16)


def _split_nibbles(b: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2, n): low nibbles then high nibbles."""
    return np.stack([b & 0x0F, b >> 4], axis=-2)


def unpack_kscales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes (..., 12) -> (scales, mins), each (..., 8) uint8 in 0..63."""
    b0, b1, b2 = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = np.concatenate([b0 & 0x3F, (b2 & 0x0F) | ((b0 >> 6) << 4)], axis=-1)
    mn = np.concatenate([b1 & 0x3F, (b2 >> 4) | ((b1 >> 6) << 4)], axis=-1)
    return sc.astype(np.uint8), mn.astype(np.uint8)


def unpack_blocks(
    data: np.ndarray, scheme_name: str, shape: tuple[int, int], name: str = ""
) -> QuantizedTensor:
    """ggml block bytes of a (rows, cols) tensor -> QuantizedTensor on scheme `scheme_name` (exact)."""
    _, block, size = (
        GGML_TYPES[scheme_name] if scheme_name in GGML_TYPES else (ggml_type_name(scheme_name), 0, 0)
    )
    rows, cols = shape
    if cols % block:
        raise QuantizeError(
            f"{name or 'tensor'}: row length {cols} is not a multiple of {scheme_name}'s block of {block}"
        )
    nb = cols // block
    raw = np.asarray(data).view(np.uint8).reshape(-1)
    if raw.size != rows * nb * size:
        raise QuantizeError(
            f"{name or 'tensor'}: {raw.size} bytes of {scheme_name} data for shape {shape}, expected {rows * nb * size}"
        )
    b = raw.reshape(rows, nb, size)
    scheme = get_scheme(scheme_name)
    params: dict[str, np.ndarray] = {}
    q: np.ndarray  # (rows, nb, block) codes
    if scheme_name in ("q2_k", "q3_k"):
        qs = b[..., 16:80] if scheme_name == "q2_k" else b[..., 32:96]
        q = ((qs.reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(
            rows, nb, 256
        )
        if scheme_name == "q2_k":
            sc = b[..., 0:16]
            params = {
                "d": _fp16_from(b[..., 80:82]),
                "dmin": _fp16_from(b[..., 82:84]),
                "scales": (sc & 0x0F).reshape(rows, nb * 16),
                "mins": (sc >> 4).reshape(rows, nb * 16),
            }
        else:
            hm = (b[..., 0:32].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
            q = q | (hm.reshape(rows, nb, 256) << 2)
            params = {
                "d": _fp16_from(b[..., 108:110]),
                "scales": unpack_q3scales(b[..., 96:108]).reshape(rows, nb * 16),
            }
    elif scheme_name == "q6_k":
        lo = _split_nibbles(b[..., 0:128].reshape(rows, nb, 2, 64))  # (rows, nb, half, nibble, 64)
        qh = b[..., 128:192].reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
        q = lo.reshape(rows, nb, 256) | ((qh & 3).reshape(rows, nb, 256) << 4)
        params = {
            "d": _fp16_from(b[..., 208:210]),
            "scales": b[..., 192:208].reshape(rows, nb * 16).view(np.int8),
        }
    elif scheme_name in ("q4_k", "q5_k"):
        sc, mn = unpack_kscales(b[..., 4:16])
        params = {
            "d": _fp16_from(b[..., 0:2]),
            "dmin": _fp16_from(b[..., 2:4]),
            "scales": sc.reshape(rows, nb * 8),
            "mins": mn.reshape(rows, nb * 8),
        }
        qs = b[..., -128:].reshape(rows, nb, 4, 32)
        q = _split_nibbles(qs).reshape(rows, nb, 256)
        if scheme_name == "q5_k":
            qh = b[..., 16:48].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)
            q = q | ((qh & 1).reshape(rows, nb, 256) << 4)
    else:
        params["d"] = _fp16_from(b[..., 0:2])
        at = 2
        if scheme_name in ("q4_1", "q5_1"):
            params["m"] = _fp16_from(b[..., 2:4])
            at = 4
        if scheme_name == "q8_0":
            q = b[..., 2:] ^ np.uint8(0x80)
        else:
            if scheme_name in ("q5_0", "q5_1"):
                hi = np.unpackbits(b[..., at : at + 4], axis=-1, bitorder="little")  # (rows, nb, 32)
                at += 4
            q = _split_nibbles(b[..., at : at + 16]).reshape(rows, nb, 32)
            if scheme_name in ("q5_0", "q5_1"):
                q = q | (hi << 4)
    codes = np.ascontiguousarray(q.reshape(rows, cols).astype(np.uint8))
    return QuantizedTensor(scheme, codes, params, name)
