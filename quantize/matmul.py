"""The dense products calibration runs on: one interface, float32 NumPy or bfloat16.

Calibration spends nearly all its time in two products per linear: the forward x·Wᵀ over every
calibration token and the Hessian chunks xᵀx. An engine makes both:

- `float32`: NumPy/BLAS, the same arithmetic as the runtime's reference forward.
- `bfloat16`: inputs rounded to bfloat16 (round to nearest even), products summed in float32, as GPU
  GPTQ implementations run in half precision. `qkiln.kernels.bf16` does it with AMX tiles where the
  CPU has them (about 4x float32 BLAS), with AVX512_BF16's vdpbf16ps where it has that instead (AMD
  Zen 4/5: about 2x float32 BLAS) and in NumPy otherwise; all round the same way, so they differ only in
  float32 summation order.

Weights are packed once per use (`pack`) and applied to many token batches (`linear`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.kernels import bf16
from qkiln.kernels.elementwise import silu_mul
from qkiln.quantize.hessian import HessianSum

DTYPES = ("float32", "bfloat16")


class GramSum(Protocol):
    @property
    def tokens(self) -> int:
        """Tokens added so far."""

    def add(self, x: np.ndarray) -> None:
        """Fold a (tokens, k) chunk in."""

    def merge(self, other: Any) -> None:
        """Add another sum of the same engine and k into this one."""

    def result(self) -> np.ndarray:
        """Σ xᵀx (k, k) over every chunk added, exactly symmetric (float32 or float64)."""


class Matmul(Protocol):
    name: str
    # the dtype an activation that only feeds this engine's products (and its Gram) is stored in: bfloat16
    # for the bfloat16 engine, whose products round their inputs to it anyway (same bits, half the memory)
    activation_dtype: np.dtype

    def pack(self, w: np.ndarray) -> Any:
        """A linear's weight (out, in) float32, in the engine's layout."""

    def linear(self, x: np.ndarray, packed: Any, out: np.ndarray | None = None) -> np.ndarray:
        """x (tokens, in) float32 or activation_dtype -> (tokens, out) float32, written into `out`
        (C-contiguous) when given."""

    def pack_glu(self, gate: np.ndarray, up: np.ndarray) -> Any:
        """A gated MLP's gate and up (inter, in) float32, in the engine's layout for `glu`."""

    def glu(self, x: np.ndarray, packed: Any, out: np.ndarray | None = None) -> np.ndarray:
        """silu(x · gateᵀ) · (x · upᵀ) (tokens, inter), written into `out` (C-contiguous; float32 or
        activation_dtype) when given, else float32."""

    def linear_add(self, x: np.ndarray, packed: Any, y: np.ndarray) -> np.ndarray:
        """y (tokens, out) float32 C-contiguous += x · Wᵀ, in place (a residual connection); returns y."""

    def gram_sum(self, k: int) -> GramSum:
        """A running Σ xᵀx over (tokens, k) chunks, float32 or activation_dtype (one summer per thread)."""

    def threads(self, n: int) -> contextlib.AbstractContextManager[object]:
        """Within the context, each product uses at most n threads (callers run several at once)."""


class F32Matmul:
    name = "float32"
    activation_dtype = np.dtype(np.float32)

    def threads(self, n: int) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()  # BLAS threads are the caller's (threadpoolctl) business

    def pack(self, w: np.ndarray) -> np.ndarray:
        return np.asarray(w, dtype=np.float32)

    def linear(self, x: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return np.matmul(x, packed.T, out=out)

    def pack_glu(self, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
        return np.concatenate([gate, up]).astype(np.float32, copy=False)  # (2 inter, in)

    def glu(self, x: np.ndarray, packed: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return _silu_of_halves(self.linear(x, packed), out)

    def linear_add(self, x: np.ndarray, packed: np.ndarray, y: np.ndarray) -> np.ndarray:
        y += np.matmul(x, packed.T)
        return y

    def gram_sum(self, k: int) -> GramSum:
        return _F32GramSum(k)


class _F32GramSum:
    """Float32 BLAS products of CHUNK_TOKENS tokens, summed in float64 (`HessianSum`)."""

    def __init__(self, k: int):
        self._sum = HessianSum(k)

    @property
    def tokens(self) -> int:
        return self._sum.n

    def add(self, x: np.ndarray) -> None:
        self._sum.add(x)

    def merge(self, other: _F32GramSum) -> None:
        self._sum.add_gram(other._sum.sum, other._sum.n)

    def result(self) -> np.ndarray:
        return self._sum.sum


class BF16Matmul:
    name = "bfloat16"

    def __init__(self) -> None:
        self._k = bf16
        self.activation_dtype = bf16.BF16
        self._threads: int | None = None  # None: the kernel's default (every core)

    @contextlib.contextmanager
    def threads(self, n: int) -> Iterator[None]:
        old = self._threads
        self._threads = n
        try:
            yield
        finally:
            self._threads = old

    def pack(self, w: np.ndarray) -> Any:
        return self._k.pack_weight(np.asarray(w, dtype=np.float32))

    def linear(self, x: np.ndarray, packed: Any, out: np.ndarray | None = None) -> np.ndarray:
        return self._k.linear(x, packed, out=out, nthreads=self._threads)

    def pack_glu(self, gate: np.ndarray, up: np.ndarray) -> Any:
        if gate.shape[0] % self._k.GLU_ROWS == 0:  # the activation formed in the product's tiles
            return self._k.pack_glu(gate, up)
        return _Concatenated(self.pack(np.concatenate([gate, up])))

    def glu(self, x: np.ndarray, packed: Any, out: np.ndarray | None = None) -> np.ndarray:
        if isinstance(packed, _Concatenated):
            return _silu_of_halves(self.linear(x, packed.weight), out)
        return self._k.linear_glu(x, packed, out=out, nthreads=self._threads)

    def linear_add(self, x: np.ndarray, packed: Any, y: np.ndarray) -> np.ndarray:
        return self._k.linear_add(x, packed, y, nthreads=self._threads)

    def gram_sum(self, k: int) -> GramSum:
        return self._k.GramSum(k, nthreads=self._threads)


class _Concatenated:
    """gate and up packed one after the other (rows not a multiple of bf16.GLU_ROWS): `glu` runs the
    product, then silu·up."""

    def __init__(self, weight: Any):
        self.weight = weight


def _silu_of_halves(gu: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """silu(gate)·up of a (tokens, 2 inter) product whose first half is the gate (into a float32 or
    bfloat16 `out`)."""
    inter = gu.shape[1] // 2
    return silu_mul(gu[:, :inter], gu[:, inter:], out=out)


def matmul_engine(dtype: str) -> Matmul:
    """The engine for a calibration dtype name ('float32' or 'bfloat16')."""
    if dtype == "float32":
        return F32Matmul()
    if dtype == "bfloat16":
        return BF16Matmul()
    raise QuantizeError(f"unknown calibration dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
