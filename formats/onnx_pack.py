"""QuantizedTensor codes → ONNX Runtime's `com.microsoft.MatMulNBits` inputs, packed as they are.

MatMulNBits (ORT contrib op) computes Y = A · Wᵀ with W (N, K) stored per row in blocks of `block_size`
columns along K:
  B            uint8 (N, n_blocks, block·bits/8)  4 bits: weight k of a block in the low nibble when k is
                                                   even, the high nibble when odd; 8 bits: one code a byte
  scales       (N, n_blocks) in A's dtype (float32 here)
  zero_points  uint8, 4 bits: (N, ceil(n_blocks/2)) with the same nibble order; 8 bits: (N, n_blocks);
               absent = 2**(bits-1)
  W[n, k] = (q − zp) · scale                      n_blocks = ceil(K / block_size)

qkiln's integer grids (`quantize.int_grid.IntGrid`) use exactly that arithmetic with unsigned codes, so a
writer only moves bits: codes become nibbles/bytes, fp16 scales widen to float32 exactly, zero points are
copied. A per-channel grid (one scale per row) is stored with a power-of-two block and the row's scale
repeated in every block (the same weights); a K the block does not divide gets a padded last block
(the padding is never read: A has K columns).

Grids MatMulNBits cannot hold are refused with a message that says what to use instead.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.int_grid import IntGrid
from qkiln.quantize.tensor import QuantizedTensor

# Block sizes MatMulNBits accepts: a power of two, at least 16 (ORT's shape inference and MLAS kernels).
BLOCK_SIZES = (16, 32, 64, 128, 256)
# The block a per-channel grid is stored with when it divides K (else the largest that does, else padded).
PER_CHANNEL_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class NBitsWeight:
    """One MatMulNBits weight, ready for initializers.

    b       (N, n_blocks, block·bits/8) uint8
    scales  (N, n_blocks) float32
    zeros   None, or 4 bits (N, ceil(n_blocks/2)) / 8 bits (N, n_blocks) uint8
    """

    k: int
    n: int
    bits: int
    block: int
    b: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None

    @property
    def nbytes(self) -> int:
        return int(self.b.nbytes + self.scales.nbytes + (0 if self.zeros is None else self.zeros.nbytes))


def check_onnx_scheme(scheme: object, tensor: str = "") -> None:
    """Refuse a grid MatMulNBits cannot hold exactly (QuantizeError, exit 2)."""

    name = getattr(scheme, "name", str(scheme))
    where = f"{tensor}: " if tensor else ""
    if isinstance(scheme, IntGrid):
        if scheme.bits not in (4, 8):
            raise QuantizeError(f"{where}{name} has {scheme.bits}-bit codes; MatMulNBits takes 4 or 8 bits")
        if scheme.group and scheme.group not in BLOCK_SIZES:
            raise QuantizeError(
                f"{where}{name} has groups of {scheme.group} columns; MatMulNBits takes blocks of "
                f"{', '.join(map(str, BLOCK_SIZES))} — use int4_g32, int4_g64 or int4_g128 (optionally _asym)"
            )
        return
    hint = "use int4_g32, int4_g64, int4_g128 (add _asym for zero points) or int8"
    if name.startswith("fp8"):
        raise QuantizeError(
            f"{where}{name}: ONNX Runtime's CPU provider has no FP8 matrix product (MatMulNBits is 4/8-bit "
            f"integer); {hint}"
        )
    if name.startswith("q") and "_k" in name:
        raise QuantizeError(
            f"{where}{name} is a llama.cpp K-quant (256-weight super-blocks with 6-bit sub-scales), which "
            f"MatMulNBits cannot hold; {hint}"
        )
    raise QuantizeError(f"{where}{name} has no MatMulNBits layout; {hint}")


def _block_for(group: int, k: int) -> int:
    if group:
        return group
    for b in (PER_CHANNEL_BLOCK, 64, 32, 16):
        if k % b == 0:
            return b
    return PER_CHANNEL_BLOCK  # padded last block


def pack_nbits(qt: QuantizedTensor) -> NBitsWeight:
    """MatMulNBits inputs holding exactly `qt.dequantize()` (codes and params moved, never re-quantized)."""
    scheme = qt.scheme
    check_onnx_scheme(scheme, qt.name)
    bits: int = scheme.bits  # type: ignore[attr-defined]
    group: int = scheme.group  # type: ignore[attr-defined]
    n, k = qt.shape
    block = _block_for(group, k)
    n_blocks = -(-k // block)
    scale = qt.params["scale"]  # (N, n_groups) float16
    zero = qt.params.get("zero")  # (N, n_groups) uint8 | None
    mid = 1 << (bits - 1)
    if not group:  # one scale per row: repeat it in every block
        scale = np.repeat(scale[:, :1], n_blocks, axis=1)
        zero = None if zero is None else np.repeat(zero[:, :1], n_blocks, axis=1)
    assert scale.shape == (n, n_blocks), (scale.shape, n, n_blocks)
    codes = qt.codes  # (N, K) uint8
    if n_blocks * block != k:  # padded last block: the zero point's code (never read)
        pad = np.full((n, n_blocks * block - k), mid, np.uint8) if zero is None else np.repeat(zero[:, -1:], n_blocks * block - k, axis=1)
        codes = np.concatenate([codes, pad], axis=1)
    codes = codes.reshape(n, n_blocks, block)
    if bits == 4:
        b = (codes[..., 0::2] & 0x0F) | ((codes[..., 1::2] & 0x0F) << 4)  # (N, n_blocks, block/2)
    else:
        b = codes
    zeros: np.ndarray | None = None
    if bits == 8:
        # 8-bit zero points are always written (one byte per block): no reliance on a default
        zeros = np.full((n, n_blocks), mid, np.uint8) if zero is None else zero.astype(np.uint8)
    elif zero is not None:
        z = zero.astype(np.uint8)
        if n_blocks % 2:
            z = np.concatenate([z, np.full((n, 1), mid, np.uint8)], axis=1)
        zeros = (z[:, 0::2] & 0x0F) | ((z[:, 1::2] & 0x0F) << 4)  # (N, ceil(n_blocks/2))
    return NBitsWeight(k=k, n=n, bits=bits, block=block, b=np.ascontiguousarray(b, dtype=np.uint8),
                       scales=np.ascontiguousarray(scale, dtype=np.float32),
                       zeros=None if zeros is None else np.ascontiguousarray(zeros))


def concat_rows(parts: list[NBitsWeight]) -> NBitsWeight:
    """Weights stacked along N (q, k, v into one packed product); they must share K, bits and block."""
    first = parts[0]
    for p in parts[1:]:
        if (p.k, p.bits, p.block, p.zeros is None) != (first.k, first.bits, first.block, first.zeros is None):
            raise AssertionError("concat_rows needs one layout")  # callers check `same_layout` first
    zeros = None if first.zeros is None else np.concatenate([p.zeros for p in parts if p.zeros is not None])
    return NBitsWeight(k=first.k, n=sum(p.n for p in parts), bits=first.bits, block=first.block,
                       b=np.concatenate([p.b for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                       zeros=zeros)


def same_layout(parts: list[NBitsWeight]) -> bool:
    first = parts[0]
    return all((p.k, p.bits, p.block, p.zeros is None) == (first.k, first.bits, first.block, first.zeros is None)
               for p in parts)


def unpack_nbits(w: NBitsWeight) -> np.ndarray:
    """The float32 weights (N, K) a runtime computes from the packed inputs (tests, `inspect`)."""
    if w.bits == 4:
        codes = np.empty((w.n, w.b.shape[1], w.block), np.uint8)
        codes[..., 0::2] = w.b & 0x0F
        codes[..., 1::2] = w.b >> 4
    else:
        codes = w.b
    n_blocks = codes.shape[1]
    if w.zeros is None:
        zp = np.full((w.n, n_blocks), 1 << (w.bits - 1), np.float32)
    elif w.bits == 4:
        z = np.empty((w.n, 2 * w.zeros.shape[1]), np.uint8)
        z[:, 0::2] = w.zeros & 0x0F
        z[:, 1::2] = w.zeros >> 4
        zp = z[:, :n_blocks].astype(np.float32)
    else:
        zp = w.zeros.astype(np.float32)
    v = (codes.astype(np.float32) - zp[:, :, None]) * w.scales[:, :, None]
    return v.reshape(w.n, -1)[:, : w.k]
