"""Weight layouts the kernels read, as data: type ids shared with qkiln/kernels/include/qkiln_kernels.h."""

from __future__ import annotations

from enum import IntEnum

QK8 = 32  # activation block (and Q4_0/Q8_0 block) length
QK_K = 256  # K-quant super-block length


class WType(IntEnum):
    """Values equal ggml's type ids where one exists, so a GGUF tensor's type maps directly."""

    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q4_0X2 = 100  # Q4_0 with row pairs interleaved for smmla
    INT4G = 101  # INT4, group size + zero points (separate arrays)
    Q4_0X8 = 102  # Q4_0 in 8-row groups for AVX-512 VNNI
    Q8_0X8 = 103  # Q8_0 in 8-row groups for AVX-512 VNNI
    INT4GX8 = 104  # INT4 g-group with zero points in 8-row groups for AVX-512 VNNI (one array)
    Q5_0X8 = 105  # Q5_0 in 8-row groups for AVX-512 VNNI (Q4_0X8's nibbles, then bit-4 masks)


# (elements per block, bytes per block); Q4_0X2 counts one row's share of a pair block.
# ggml's own types, as gguf-py's GGML_QUANT_SIZES gives them. Restated because the kernels run on a bare
# Python + NumPy (the aarch64 check under qemu has no gguf); tests/kernels/test_kernels_native.py checks this
# table and common.h's C constants against GGML_QUANT_SIZES.
BLOCK: dict[WType, tuple[int, int]] = {
    WType.Q4_0: (32, 18),
    WType.Q4_1: (32, 20),
    WType.Q5_0: (32, 22),
    WType.Q5_1: (32, 24),
    WType.Q8_0: (32, 34),
    WType.Q2_K: (256, 84),
    WType.Q3_K: (256, 110),
    WType.Q4_K: (256, 144),
    WType.Q5_K: (256, 176),
    WType.Q6_K: (256, 210),
}


def block_bytes(wtype: WType, n: int, k: int) -> int:
    """Total bytes of an (N, K) matrix in `wtype`'s layout."""
    if wtype == WType.Q4_0X2:
        return (n + 1) // 2 * (k // QK8) * 36
    if wtype == WType.Q4_0X8:
        return (n + 7) // 8 * (k // QK8) * 144
    if wtype == WType.Q8_0X8:
        return (n + 7) // 8 * (k // QK8) * 272
    if wtype == WType.Q5_0X8:
        return (n + 7) // 8 * (k // QK8) * 176
    elems, nbytes = BLOCK[wtype]
    if k % elems:
        raise ValueError(f"K={k} is not a multiple of {elems} for {wtype.name}")
    return n * (k // elems) * nbytes


def int4gx8_bytes(n: int, k: int, group: int) -> int:
    """Bytes of an (N, K) INT4 g`group` matrix in the INT4GX8 layout (qk_int4gx8_bytes)."""
    if group <= 0 or group % QK8 or k % group:
        raise ValueError(f"INT4 group {group} must be a multiple of {QK8} dividing K={k}")
    return (n + 7) // 8 * (k // group) * (40 + group // QK8 * 128)
