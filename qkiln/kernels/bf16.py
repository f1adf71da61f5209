"""bf16 matrix products for GPTQ calibration: a linear layer's forward and the Hessian core XᵀX.

Why bf16: calibration pushes ~65k tokens through every linear layer and accumulates XᵀX per layer (~20 TFLOP
in all); float32 BLAS does ~180 GFLOPS on a 2-core machine, Intel AMX's tdpbf16ps several times that, and
AVX512_BF16's vdpbf16ps (AMD Zen 4/5, Intel Cooper Lake) twice float32's multiply rate. Every path computes
the same thing, so results do not depend on the machine beyond float32 summation order:

* inputs are rounded to bf16 by `round_bf16` (the rule below), products of two bf16 values are exact in
  float32 (8 + 8 significant bits), and the products are summed in float32;
* "amx" and "avx512bf16": the C kernels in qkiln/kernels/src/x86/bf16.c, one code over the same packed layouts
  and blocking, whose 32 x 32 blocks of float32 accumulators are AMX tiles (tdpbf16ps) or, without AMX,
  registers and memory updated by vdpbf16ps; every core unless nthreads says otherwise. Their bytes depend on
  the inputs only, never on the thread count or blocking: `linear` sums each output over k in k order (amx:
  in one accumulator; avx512bf16: runs of 256 products, each summed from zero and added in order); `gram`
  sums each group of 8192 tokens in token order (32 tokens per step, the same runs) and adds the groups'
  sums in group order. The two differ from each other in the last bits;
* "numpy": `round_bf16` the inputs (one C pass, `kernels.elementwise`; NumPy's `kernels.reference` function
  without the library: the same bits), then float32 `np.matmul`.

Rounding rule (`round_bf16`): float32 denormals (exponent field 0) become a zero of the same sign, then
round to nearest with ties to even; values past the largest bf16 become ±inf; NaN stays NaN (quiet bit set,
payload truncated). This is exactly what vcvtne2ps2bf16 does (tests compare the C conversion bit for bit).
The flush matters only for |x| < 1.2e-38.

Tolerance: with s = Σᵢ |xᵢ wᵢ| over the K reduced terms (features for `linear`, tokens for `gram`) of the
rounded inputs, each path's float32 sum of K exact products is within K·2⁻²⁴·s of the exact sum (the
classical recursive-summation bound, valid for any summation order; tdpbf16ps also flushes denormal results,
adding at most K·2⁻¹²⁶). So |c − numpy| ≤ 2·K·2⁻²⁴·s + 2·K·2⁻¹²⁶ for either C path c. That bound is the worst case; the
observed error is far smaller because rounding errors cancel and both paths sum in blocks: on random normal
data the largest error/s was 7e-8 (linear, K=576; avx512bf16 1.2e-7) and 3e-7 / 3.9e-7 / 1.3e-6 (Gram over
65536 tokens, amx / avx512bf16 / numpy; the median 1e-9). The tests hold every path to the bound and to error/s ≤ 2e-6.

QKILN_KERNEL=numpy forces the NumPy path (other values of that variable choose among the quantized-kernel
paths and do not affect this module, which picks the best C path: amx, then avx512bf16).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from qkiln.kernels.api import ENV, KernelError
from qkiln.kernels.blas import one_blas_thread
from qkiln.kernels.build import BuildError, build_library
from qkiln.kernels.elementwise import round_bf16, silu_mul, widen
from qkiln.kernels.reference import BF16

PATHS = ("amx", "avx512bf16", "numpy")
_ENGINES = {"amx": 1, "avx512bf16": 2}  # the C paths as bf16.c's engine numbers (qk_bf16_engines' bits)
_MISSING = {"amx": "this CPU/OS has no usable AMX-BF16 (cpuid, XCR0 or arch_prctl permission)",
            "avx512bf16": "this CPU has no AVX512_BF16 (or the OS does not save the ZMM state)"}

_lock = threading.Lock()
_lib: Any = None
_lib_error: str | None = None
_loaded = False


def _declare(lib: Any) -> None:
    i64, vp, c_int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    sig = {
        "qk_bf16_engines": (c_int, []),
        "qk_bf16_round": (None, [vp, i64, vp]),
        "qk_bf16_packed_bytes": (ctypes.c_size_t, [i64, i64]),
        "qk_bf16_pack_weight": (None, [vp, i64, i64, vp]),
        "qk_bf16_linear": (c_int, [vp, i64, i64, vp, i64, vp, c_int]),
        "qk_bf16_linear_ex": (c_int, [vp, c_int, i64, i64, vp, i64, vp, c_int, c_int, c_int, c_int]),
        "qk_bf16_gram": (c_int, [vp, i64, i64, vp, c_int, c_int]),
        "qk_bf16_gram_acc_floats": (ctypes.c_size_t, [i64]),
        "qk_bf16_gram_acc": (c_int, [vp, c_int, i64, i64, vp, c_int, c_int, c_int]),
        "qk_bf16_gram_acc_write": (c_int, [vp, i64, vp]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


_engines = 0  # qk_bf16_engines() of the loaded library


def _library() -> Any:
    """The kernel library (the same shared object kernels.api loads) if it loads with the bf16 products and
    one of their engines can run here, else None (`_lib_error` says why)."""
    global _lib, _lib_error, _loaded, _engines
    with _lock:
        if not _loaded:
            _loaded = True

            try:
                lib = ctypes.CDLL(os.environ.get("QKILN_KERNELS_LIB") or str(build_library()))
                _declare(lib)  # AttributeError: a library without x86/bf16.c (aarch64, or stale)
                _engines = lib.qk_bf16_engines()
                if not _engines:
                    raise OSError(f"{_MISSING['amx']}; {_MISSING['avx512bf16']}")
                _lib = lib
            except (BuildError, OSError, AttributeError) as e:
                _lib_error = str(e).splitlines()[0]
        return _lib


def unavailable_reason(path: str) -> str | None:
    """Why a path cannot run here (None when it can): for skip messages and errors."""
    if path not in PATHS:
        raise KernelError(f"unknown bf16 path {path!r}; use one of {', '.join(PATHS)}")
    if path == "numpy":
        return None
    if _library() is None:
        return _lib_error
    return None if _engines & _ENGINES[path] else _MISSING[path]


def available(path: str) -> bool:
    """True when `path` can run here (the C library loads and the CPU has what the path needs)."""
    return unavailable_reason(path) is None


def c_paths() -> tuple[str, ...]:
    """The C paths that can run here, fastest first."""
    return tuple(p for p in _ENGINES if available(p))


def bf16_path() -> str:
    """The default path: 'numpy' when QKILN_KERNEL=numpy or no C path can run, else the fastest C path."""
    if os.environ.get(ENV, "").strip().lower() == "numpy":
        return "numpy"
    return (c_paths() or ("numpy",))[0]


def _resolve(path: str | None) -> str:
    if path is None:
        return bf16_path()
    why = unavailable_reason(path)
    if why is not None:
        raise KernelError(f"the {path} bf16 path cannot run here: {why}")
    return path


def round_bf16_c(a: np.ndarray) -> np.ndarray:
    """The C conversion (vcvtne2ps2bf16) as float32, for tests that pin it to `round_bf16`."""
    lib = _library()
    if lib is None:
        raise KernelError(f"the C bf16 paths cannot run here: {_lib_error}")
    x = np.ascontiguousarray(a, dtype=np.float32)
    bits = np.empty(x.shape, np.uint16)
    lib.qk_bf16_round(_ptr(x), x.size, _ptr(bits))
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _ptr(a: np.ndarray) -> int:
    return int(a.__array_interface__["data"][0])


def aligned_empty(shape: tuple[int, int]) -> np.ndarray:
    """Uninitialized float32 array whose data starts on a 64-byte boundary: as an `out=` of `linear` or
    `gram`, the kernels stream large results past the caches (that needs aligned rows)."""
    return _empty64(shape)


def _empty64(shape: tuple[int, int]) -> np.ndarray:
    """Uninitialized float32 array whose data starts on a 64-byte boundary (the kernel then streams large
    outputs past the caches, which needs aligned rows)."""
    nbytes = shape[0] * shape[1] * 4
    raw = np.empty(nbytes + 64, np.uint8)
    off = -_ptr(raw) % 64
    return raw[off : off + nbytes].view(np.float32).reshape(shape)


def _threads(nthreads: int | None) -> int:
    return 0 if nthreads is None else int(nthreads)


@dataclass(frozen=True)
class BF16Weight:
    """A linear layer's weight W (n, k) (y = x Wᵀ) ready for `linear` on one path.

    `packed` (uint16 bf16 B tiles, x86/bf16.c's layout) for a C path, or `rounded` (float32 (n, k),
    round_bf16(W)) for the numpy path; the path is fixed when packing so a product never silently changes
    path."""

    shape: tuple[int, int]
    path: str
    packed: np.ndarray | None = None
    rounded: np.ndarray | None = None


def pack_weight(w: np.ndarray, *, path: str | None = None) -> BF16Weight:
    """W (n, k) float -> BF16Weight for the given path (default `bf16_path()`)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"weight must be 2-D (n, k), got shape {w.shape}")
    n, k = w.shape
    path = _resolve(path)
    if path == "numpy":
        return BF16Weight((n, k), path, rounded=_round_rows(w, np.empty((n, k), np.float32)))
    lib = _library()
    packed = np.zeros(lib.qk_bf16_packed_bytes(n, k) // 2, np.uint16)  # (tiles * 512,)
    if n and k:
        lib.qk_bf16_pack_weight(_ptr(w), n, k, _ptr(packed))
    return BF16Weight((n, k), path, packed=packed)




def _as_x(x: np.ndarray, what: str) -> np.ndarray:
    """x as a C-contiguous 2-D float32 array, or bfloat16 as given (its values are what the products use)."""
    x = np.asarray(x)
    x = np.ascontiguousarray(x, dtype=x.dtype if x.dtype == BF16 else np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what} input must be 2-D (m, k), got shape {x.shape}")
    return x


def _check_out(out: np.ndarray | None, shape: tuple[int, int], what: str, dtypes: tuple[Any, ...] = (np.float32,)) -> None:
    if out is not None and (out.shape != shape or out.dtype not in dtypes or not out.flags.c_contiguous
                            or not out.flags.writeable):
        names = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{what}: out must be a writeable C-contiguous {names} array of shape {shape}")


# Floats of the NumPy path's per-call temporaries (a block of tokens' rounded inputs or gate/up products):
# at an 8B model's shape one batch's (4096, 28672) gate/up product alone was 470 MB per worker.
NUMPY_CHUNK_FLOATS = 1 << 23


def _bf16_values(x: np.ndarray) -> np.ndarray:
    """x (m, k) as the float32 values the bf16 products use: bfloat16 input widened (already rounded),
    float32 input rounded to bf16."""
    return widen(x) if x.dtype == BF16 else round_bf16(x)


# Features per block of the NumPy Gram (`_upper_gram_add`): the upper block triangle, blocks of equal width up to
# GRAM_BLOCK, each one BLAS product with a temporary of at most GRAM_BLOCK² floats (4 MB, where a whole (k, k)
# one at k = 14336, an 8B model's down_proj input, is 822 MB). The demo's widths: 576, one block; 1536, two.
GRAM_BLOCK = 1024


def _upper_gram_add(x: np.ndarray, acc: np.ndarray) -> None:
    """acc's upper triangle += xᵀx (x (m, k) float32, acc (k, k) float32 C-contiguous), in place, by blocks of
    features: a diagonal block is NumPy's syrk (`xᵢᵀ @ xᵢ` of one operand: the triangle and its mirror, no
    multiply-add wasted below the diagonal), a block right of it one sgemm; blocks left of the diagonal are
    never made or written. On one BLAS thread: OpenBLAS's threaded syrk sums in an order that depends on the
    thread count, and calibration's workers run a sum each. NumPy's matmul releases the GIL, so those sums run
    on every core at once (scipy's ssyrk held it: two workers ran one after the other). One Zen 3 thread, 4096
    tokens, best of 15 alternating runs: 576 wide 67.8 → 82.2 GFLOP/s of the triangle, 1536 wide 78.4 → 85.1,
    against blocks of 128 rows from the diagonal on (products over the diagonal blocks' lower halves too)."""
    k = x.shape[1]
    width = -(-k // -(-k // GRAM_BLOCK))  # equal blocks: 1536 -> 2 x 768, not 1024 + 512
    with one_blas_thread():
        for i0 in range(0, k, width):
            i1 = min(k, i0 + width)
            xi = x[:, i0:i1]  # (m, block)
            acc[i0:i1, i0:i1] += xi.T @ xi
            for j0 in range(i1, k, width):
                j1 = min(k, j0 + width)
                acc[i0:i1, j0:j1] += np.matmul(xi.T, x[:, j0:j1])


def _mirror_upper(g: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """g's upper triangle and its mirror (exactly symmetric), into `out` when given, else in place in `g`
    (a block of rows at a time: no (k, k) temporary)."""
    out = g if out is None else out
    k = g.shape[0]
    for r0 in range(0, k, 256):
        r1 = min(k, r0 + 256)
        rows = np.triu(g[r0:r1], r0)  # (rows, k): upper part of these rows
        rows[:, :r1] += np.tril(g[:r1, r0:r1].T, r0 - 1)  # below the diagonal: the mirror of the columns
        out[r0:r1] = rows
    return out


def linear(x: np.ndarray, w: BF16Weight, *, out: np.ndarray | None = None,
           nthreads: int | None = None) -> np.ndarray:
    """y (m, n) float32 = bf16(x) (m, k) · bf16(W)ᵀ with float32 accumulation, on the weight's path.

    x float32, or bfloat16 (taken as it is). `out`: a C-contiguous float32 (m, n) array to write y into
    (returned). Reusing one across calls saves the kernel's page zeroing of a fresh output, which costs
    ~0.1 s per 400 MB."""
    x, m, n = _linear_args(x, w, out, "linear")
    if w.rounded is not None:
        return np.matmul(_bf16_values(x), w.rounded.T, out=out)
    y = _empty64((m, n)) if out is None else out
    _linear_c(x, w, y, 0, nthreads)
    return y


def linear_add(x: np.ndarray, w: BF16Weight, y: np.ndarray, *, nthreads: int | None = None) -> np.ndarray:
    """y (m, n) float32 += bf16(x) (m, k) · bf16(W)ᵀ, in place (returned): on the C paths each output's
    float32 accumulator starts from y, so a residual connection needs no product written out and re-read."""
    x, _, _ = _linear_args(x, w, y, "linear_add")
    if w.rounded is not None:
        y += np.matmul(_bf16_values(x), w.rounded.T)
    else:
        _linear_c(x, w, y, 1, nthreads)
    return y


GLU_ROWS = 16  # pack_glu interleaves the gate's and up's rows in runs of this many


def pack_glu(gate: np.ndarray, up: np.ndarray, *, path: str | None = None) -> BF16Weight:
    """A gated MLP's gate and up (inter, k) as one BF16Weight for `linear_glu`. C paths: their rows interleaved
    in runs of 16 (gate rows 16i.. then up rows 16i..), so that each 32-output pair of the AMX linear holds the
    gate and up of the same 16 columns. NumPy path: gate's rows, then up's, each product made as `linear` makes
    it (a BLAS sum's order may depend on the product's shape: one (tokens, 2·inter) product gave other bits
    than the two (tokens, inter) ones on an AVX2 host's OpenBLAS). inter must be a multiple of 16."""
    gate = np.asarray(gate, dtype=np.float32)
    up = np.asarray(up, dtype=np.float32)
    inter, k = gate.shape
    if up.shape != gate.shape or inter % GLU_ROWS:
        raise ValueError(f"pack_glu: gate {gate.shape} and up {up.shape} must match, rows a multiple of {GLU_ROWS}")
    runs = (inter // GLU_ROWS, 1, GLU_ROWS, k)
    if _resolve(path) == "numpy":  # rounded straight into place: no concatenated copy
        rounded = np.empty((2, inter, k), np.float32)
        for half, src in enumerate((gate, up)):
            _round_rows(src, rounded[half])
        return BF16Weight((2 * inter, k), "numpy", rounded=rounded.reshape(2 * inter, k))
    return pack_weight(np.concatenate([gate.reshape(runs), up.reshape(runs)], axis=1).reshape(2 * inter, k), path=path)


def _round_rows(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """dst[...] = round_bf16(src), a block of leading rows at a time (no whole-size temporaries); dst."""
    step = max(1, NUMPY_CHUNK_FLOATS // max(1, src[0].size if len(src) else 1))
    for r0 in range(0, len(src), step):
        dst[r0 : r0 + step] = round_bf16(src[r0 : r0 + step])
    return dst


def linear_glu(x: np.ndarray, w: BF16Weight, *, out: np.ndarray | None = None,
               nthreads: int | None = None) -> np.ndarray:
    """silu(g)·u (m, inter) for g, u = bf16(x)·bf16(gate)ᵀ, bf16(x)·bf16(up)ᵀ and w = pack_glu(gate, up).

    On the C paths the activation is formed from the accumulators, so the (m, 2·inter) product is
    never written; both paths compute silu·up with `kernels.elementwise.silu_mul`'s arithmetic. `out`
    float32, or bfloat16: the activation rounded as the next product would round it (half the memory)."""
    x, m, n = _linear_args(x, w, None, "linear_glu")
    _check_out(out, (m, n // 2), "linear_glu", (np.float32, BF16))
    if w.rounded is not None:
        y = np.empty((m, n // 2), np.float32) if out is None else out
        gate, up = w.rounded[: n // 2], w.rounded[n // 2 :]
        step = max(1, NUMPY_CHUNK_FLOATS // n)  # a block of tokens: (tokens, inter) twice at a time
        for r0 in range(0, m, step):
            xb = _bf16_values(x[r0 : r0 + step])
            silu_mul(np.matmul(xb, gate.T), np.matmul(xb, up.T), out=y[r0 : r0 + len(xb)])
        return y
    y = _empty64((m, n // 2)) if out is None else out
    _linear_c(x, w, y, 2, nthreads)
    return y


def _linear_args(x: np.ndarray, w: BF16Weight, out: np.ndarray | None, what: str) -> tuple[np.ndarray, int, int]:
    x = _as_x(x, what)
    m, k = x.shape
    n, wk = w.shape
    if k != wk:
        raise ValueError(f"{what}: x has width {k}, weight is {w.shape}")
    _check_out(out, (m, n), what)
    return x, m, n


def _linear_c(x: np.ndarray, w: BF16Weight, y: np.ndarray, mode: int, nthreads: int | None) -> None:
    """qk_bf16_linear_ex: mode 0 y = x Wᵀ, 1 y += x Wᵀ, 2 y = silu(gate)·up (see x86/bf16.c), on the weight's path."""
    lib = _library()
    assert lib is not None and w.packed is not None, "a C-packed weight implies the library loaded"
    m, k = x.shape
    rc = lib.qk_bf16_linear_ex(_ptr(x), int(x.dtype == BF16), m, k, _ptr(w.packed), w.shape[0], _ptr(y), mode,
                               int(y.dtype == BF16), _threads(nthreads), _ENGINES[w.path])
    if rc != 0:
        raise MemoryError(f"qk_bf16_linear_ex (mode {mode}) failed (code {rc})")


def gram(x: np.ndarray, *, path: str | None = None, nthreads: int | None = None,
         out: np.ndarray | None = None) -> np.ndarray:
    """(k, k) float32 = bf16(x)ᵀ · bf16(x) for x (m, k), float32 accumulation; exactly symmetric.

    `out`: a C-contiguous float32 (k, k) array to write the result into (returned); reusing one across
    calls saves the page zeroing of a fresh result (~2 ms per call at k=1536). 64-byte aligned rows (k a
    multiple of 16 and an aligned base, as `aligned_empty` gives) let the kernel stream a large result."""
    x = widen(_as_x(x, "gram"))
    m, k = x.shape
    _check_out(out, (k, k), "gram")
    path = _resolve(path)
    if path == "numpy":
        xr = round_bf16(x)  # (m, k)
        return _mirror_upper(np.matmul(xr.T, xr).astype(np.float32, copy=False), out)
    if out is None:
        out = _empty64((k, k))  # (k, k)
    rc = _library().qk_bf16_gram(_ptr(x), m, k, _ptr(out), _threads(nthreads), _ENGINES[path])
    if rc != 0:
        raise MemoryError(f"qk_bf16_gram failed (code {rc})")
    return out


class GramSum:
    """Running bf16(x)ᵀ·bf16(x) over many (m, k) chunks, float32 accumulation; `result()` is exactly symmetric.

    What calibration sums per input group: with `gram` each chunk's (k, k) result is written out, mirrored,
    and re-added by the caller — at k = 1536 about as much memory traffic as the chunk's products. On the C
    paths the float32 tile accumulators stay in this object's buffer between `add` calls (the kernel's own
    layout) and are mirrored into a (k, k) array once, by `result`. Summation order: every token in `add`
    order, 32 at a time, into one float32 accumulator per element (numpy path: each chunk's float32 product
    added in order), so the bytes do not depend on `nthreads`. Not thread-safe: one summer per thread.
    """

    def __init__(self, k: int, *, path: str | None = None, nthreads: int | None = None):
        self.k, self.path, self.nthreads = k, _resolve(path), nthreads
        self.tokens = 0
        if self.path != "numpy":
            floats = int(_library().qk_bf16_gram_acc_floats(k))
            self._acc = _empty64((1, max(floats, 1)))  # the kernel's tile accumulators
        else:
            self._acc = np.zeros((k, k), np.float32)

    def add(self, x: np.ndarray) -> None:
        """Fold the tokens x (m, k) in."""
        x = _as_x(x, "GramSum.add")
        m, k = x.shape
        if k != self.k:
            raise ValueError(f"GramSum.add: x has width {k}, the sum is over {self.k} features")
        if self.path == "numpy":
            step = max(1, NUMPY_CHUNK_FLOATS // k)  # a block of tokens at a time
            for r0 in range(0, m, step):
                _upper_gram_add(_bf16_values(x[r0 : r0 + step]), self._acc)
        else:
            rc = _library().qk_bf16_gram_acc(_ptr(x), int(x.dtype == BF16), m, k, _ptr(self._acc),
                                             int(self.tokens == 0), _threads(self.nthreads), _ENGINES[self.path])
            if rc != 0:
                raise MemoryError(f"qk_bf16_gram_acc failed (code {rc})")
        self.tokens += m

    def merge(self, other: GramSum) -> None:
        """Add another sum's accumulators into this one (float32, element by element; same k and path):
        several running sums become one before the single (k, k) write of `result`."""
        if (other.k, other.path) != (self.k, self.path):
            raise ValueError(f"GramSum.merge: a {other.path} sum over {other.k} features into a {self.path} one over {self.k}")
        if other.tokens == 0:
            return
        if self.tokens == 0:
            self._acc[...] = other._acc
        else:
            self._acc += other._acc
        self.tokens += other.tokens

    def result(self, out: np.ndarray | None = None) -> np.ndarray:
        """Σ bf16(x)ᵀ·bf16(x) (k, k) float32 over every chunk added (zeros before any). Without `out`, the numpy
        path mirrors its accumulator in place and returns it (no second (k, k) array): call it last."""
        k = self.k
        _check_out(out, (k, k), "GramSum.result")
        if self.path == "numpy":
            return _mirror_upper(self._acc, out)
        if out is None:
            out = _empty64((k, k))
        if self.tokens == 0:
            out[...] = 0.0
            return out
        rc = _library().qk_bf16_gram_acc_write(_ptr(self._acc), k, _ptr(out))
        if rc != 0:
            raise MemoryError(f"qk_bf16_gram_acc_write failed (code {rc})")
        return out
