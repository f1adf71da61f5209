"""Python entry points to the quantized kernels: the C library when it builds and loads, else NumPy.

QKILN_KERNEL=scalar|avx2|avx512|neon|dotprod|i8mm|sve|numpy forces a path; a path this CPU cannot run is
a UserError (not a silent fallback), so a benchmark never reports the wrong thing. `kernel_path()` names
the path in use.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np

from qkiln.errors import UserError
from qkiln.kernels import numpy_ref
from qkiln.kernels.build import BuildError, build_library
from qkiln.kernels.numpy_ref import Q8Activations
from qkiln.kernels.types import QK8, WType, block_bytes, int4gx8_bytes

ENV = "QKILN_KERNEL"
C_PATHS = ("scalar", "avx2", "avx512", "neon", "dotprod", "i8mm", "sve")
ALL_PATHS = (*C_PATHS, "numpy")


class KernelError(UserError):
    """A requested kernel path is unknown or cannot run on this machine."""


_lock = threading.RLock()  # re-entrant: error messages call available_paths()
_lib: Any = None
_lib_error: str | None = None
_use_numpy = False
_loaded = False
_env_error: KernelError | None = None

_i8p = ctypes.POINTER(ctypes.c_int8)
_f32p = ctypes.POINTER(ctypes.c_float)
_i32p = ctypes.POINTER(ctypes.c_int32)
_u8p = ctypes.POINTER(ctypes.c_uint8)
_vp = ctypes.c_void_p


def _declare(lib: Any) -> None:
    c_int, c_char_p, c_uint, c_size_t = ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_size_t
    sig = {
        "qk_abi_version": (c_int, []),
        "qk_path_name": (c_char_p, []),
        "qk_path_name_of": (c_char_p, [c_int]),
        "qk_available_paths": (c_uint, []),
        "qk_set_path": (c_int, [c_char_p]),
        "qk_sve_bytes": (c_int, []),
        "qk_default_threads": (c_int, []),
        "qk_quantize_q8": (None, [_vp, c_int, c_int, _vp, _vp, _vp]),
        "qk_gemm": (c_int, [c_int, _vp, c_int, c_int, _vp, _vp, _vp, c_int, _vp, c_int]),
        "qk_gemm_int4g": (c_int, [_vp, _vp, _vp, c_int, c_int, c_int, _vp, _vp, _vp, c_int, _vp, c_int]),
        "qk_linear_f32": (c_int, [c_int, _vp, c_int, c_int, _vp, c_int, _vp, c_int]),
        "qk_copy_mt": (None, [_vp, _vp, c_size_t, c_int]),
        "qk_read_mt": (ctypes.c_uint64, [_vp, c_size_t, c_int]),
        "qk_q4_0x8_bytes": (c_size_t, [c_int, c_int]),
        "qk_repack_q4_0x8": (None, [_vp, c_int, c_int, _vp]),
        "qk_q8_0x8_bytes": (c_size_t, [c_int, c_int]),
        "qk_repack_q8_0x8": (None, [_vp, c_int, c_int, _vp]),
        "qk_q5_0x8_bytes": (c_size_t, [c_int, c_int]),
        "qk_repack_q5_0x8": (None, [_vp, c_int, c_int, _vp]),
        "qk_int4gx8_bytes": (c_size_t, [c_int, c_int, c_int]),
        "qk_repack_int4gx8": (None, [_vp, _vp, _vp, c_int, c_int, c_int, _vp]),
        "qk_gemm_int4gx8": (c_int, [_vp, c_int, c_int, c_int, _vp, _vp, _vp, c_int, _vp, c_int]),
        "qk_q4_0x2_bytes": (c_size_t, [c_int, c_int]),
        "qk_repack_q4_0x2": (None, [_vp, c_int, c_int, _vp]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


def _load() -> None:
    """Build/load the C library once; apply QKILN_KERNEL."""
    global _lib, _lib_error, _use_numpy, _loaded, _env_error
    with _lock:
        if _env_error is not None:
            raise _env_error
        if _loaded:
            return
        want = os.environ.get(ENV, "").strip().lower()
        if want and want not in ALL_PATHS:
            raise KernelError(f"{ENV}={want!r} is not a kernel path; use one of {', '.join(ALL_PATHS)}")
        if want != "numpy" and _lib is None:
            try:
                # QKILN_KERNELS_LIB: a prebuilt library (cross-compiled for qemu, or packaged); else build/cache
                lib = ctypes.CDLL(os.environ.get("QKILN_KERNELS_LIB") or str(build_library()))
                _declare(lib)
                if lib.qk_abi_version() != 1:
                    raise OSError("stale kernel library (ABI version mismatch)")
                _lib = lib
            except (BuildError, OSError) as e:
                _lib_error = str(e).splitlines()[0]
        _loaded = True
        if want == "numpy":
            _use_numpy = True
        elif _lib is None:
            if want:
                raise KernelError(f"{ENV}={want} needs the C kernels, which could not be built: {_lib_error}")
            _use_numpy = True
        elif want:
            try:
                _set_c_path(want)
            except KernelError as e:
                _env_error = KernelError(f"{ENV}={want}: {e}")
                raise _env_error from None


def reset() -> None:
    """Forget the path choice so the next use re-reads QKILN_KERNEL (tests that change the environment);
    the loaded library stays loaded and is reused."""
    global _use_numpy, _loaded, _env_error
    with _lock:
        _use_numpy, _loaded, _env_error = False, False, None
        if _lib is not None:
            best = next(p for p in ("avx512", "avx2", "i8mm", "sve", "dotprod", "neon", "scalar")  # dispatch.c's order
                        if _lib.qk_available_paths() >> C_PATHS.index(p) & 1)
            _lib.qk_set_path(best.encode())


def _set_c_path(name: str) -> None:
    rc = _lib.qk_set_path(name.encode())
    if rc == -2:
        raise KernelError(
            f"kernel path {name!r} is not supported by this CPU/build; available: {', '.join(available_paths())}")
    if rc != 0:
        raise KernelError(f"unknown kernel path {name!r}; use one of {', '.join(ALL_PATHS)}")


def available_paths() -> list[str]:
    """Paths this machine can run, best first is not implied; 'numpy' is always there."""
    _load()
    if _lib is None:
        return ["numpy"]
    mask = _lib.qk_available_paths()
    return [p for i, p in enumerate(C_PATHS) if mask >> i & 1] + ["numpy"]


def set_kernel_path(name: str) -> None:
    """Switch paths in this process (tests, benchmarks); same errors as QKILN_KERNEL."""
    global _use_numpy
    _load()
    name = name.lower()
    if name == "numpy":
        _use_numpy = True
        return
    if name not in C_PATHS:
        raise KernelError(f"unknown kernel path {name!r}; use one of {', '.join(ALL_PATHS)}")
    if _lib is None:
        raise KernelError(f"kernel path {name!r} needs the C kernels, which could not be built: {_lib_error}")
    _set_c_path(name)
    _use_numpy = False


def kernel_path() -> str:
    """Name of the path products run on: a C path name, or 'numpy'."""
    _load()
    return "numpy" if _use_numpy else _lib.qk_path_name().decode()


def sve_bytes() -> int:
    _load()
    return 0 if _lib is None else int(_lib.qk_sve_bytes())


def default_threads() -> int:
    _load()
    return os.cpu_count() or 1 if _lib is None else int(_lib.qk_default_threads())


def _ptr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def quantize_activations_q8(x: np.ndarray) -> Q8Activations:
    """x (M, K) or (K,) float -> Q8Activations; bit-identical in C and NumPy."""
    _load()
    x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
    m, k = x.shape
    if k % QK8:
        raise ValueError(f"activation width {k} is not a multiple of {QK8}")
    if _use_numpy:
        return numpy_ref.quantize_q8(x)
    qs = np.empty((m, k), np.int8)
    d = np.empty((m, k // QK8), np.float32)
    sums = np.empty((m, k // QK8), np.int32)
    _lib.qk_quantize_q8(_ptr(x), m, k, _ptr(qs), _ptr(d), _ptr(sums))
    return Q8Activations(qs, d, sums)


def _as_act(x: np.ndarray | Q8Activations) -> Q8Activations:
    return x if isinstance(x, Q8Activations) else quantize_activations_q8(x)


def _threads(nthreads: int | None) -> int:
    return 0 if nthreads is None else int(nthreads)


def gemm(wtype: WType, w: np.ndarray, n: int, k: int, x: np.ndarray | Q8Activations,
         nthreads: int | None = None) -> np.ndarray:
    """y (M, N) f32 = W x for ggml-layout weight bytes `w` (a `types.BLOCK` type, or a repack: Q4_0X2, ...)."""
    _load()
    wtype = WType(wtype)
    w = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if w.size != block_bytes(wtype, n, k):
        raise ValueError(f"{wtype.name} weights of shape ({n}, {k}) need {block_bytes(wtype, n, k)} bytes, got {w.size}")
    act = _as_act(x)
    if act.qs.shape[1] != k:
        raise ValueError(f"activations have width {act.qs.shape[1]}, weights {k}")
    if _use_numpy:
        return numpy_ref.gemm(wtype, w, n, k, act)
    m = act.qs.shape[0]
    y = np.empty((m, n), np.float32)
    rc = _lib.qk_gemm(int(wtype), _ptr(w), n, k, _ptr(act.qs), _ptr(act.d), _ptr(act.sums), m, _ptr(y),
                      _threads(nthreads))
    if rc != 0:
        raise ValueError(f"qk_gemm rejected {wtype.name} ({n}, {k}) x M={m}")
    return y


def linear_f32(wtype: WType, w: np.ndarray, n: int, k: int, x: np.ndarray, nthreads: int | None = None
               ) -> np.ndarray:
    """Quantize x (M, K) and multiply in one C call (the runtime's hot path); NumPy otherwise."""
    _load()
    if _use_numpy:
        return gemm(wtype, w, n, k, x, nthreads)
    x = np.ascontiguousarray(x, dtype=np.float32)
    m = x.shape[0]
    y = np.empty((m, n), np.float32)
    rc = _lib.qk_linear_f32(int(wtype), _ptr(w), n, k, _ptr(x), m, _ptr(y), _threads(nthreads))
    if rc != 0:
        raise ValueError(f"qk_linear_f32 rejected {WType(wtype).name} ({n}, {k}) x M={m}")
    return y


def linear_fn(wtype: WType, w: np.ndarray, n: int, k: int, nthreads: int | None = None):
    """A callable x (M, K) f32 -> y (M, N) f32 bound to these weights, with the per-call work cut to the C
    call (decode runs a few hundred small products per token, so Python overhead matters). Keeps `w` alive."""
    _load()
    if _use_numpy:
        return lambda x: gemm(wtype, w, n, k, x, nthreads)
    w = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if w.size != block_bytes(WType(wtype), n, k):
        raise ValueError(f"{WType(wtype).name} weights of shape ({n}, {k}) need {block_bytes(WType(wtype), n, k)} bytes")
    fn, wptr, t, code = _lib.qk_linear_f32, _ptr(w), _threads(nthreads), int(wtype)

    def run(x: np.ndarray, _keep: np.ndarray = w) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        y = np.empty((m, n), np.float32)
        if fn(code, wptr, n, k, x.ctypes.data, m, y.ctypes.data, t) != 0:
            raise ValueError(f"qk_linear_f32 rejected {WType(code).name} ({n}, {k}) x M={m}")
        return y

    return run


def gemv_q4_0(packed: np.ndarray, x: np.ndarray, n: int, k: int, nthreads: int | None = None) -> np.ndarray:
    """y (N,) = W x for one activation vector x (K,) and Q4_0 bytes."""
    return gemm(WType.Q4_0, packed, n, k, np.asarray(x).reshape(1, -1), nthreads)[0]


def gemm_q4_0(packed: np.ndarray, x: np.ndarray, n: int, k: int, nthreads: int | None = None) -> np.ndarray:
    return gemm(WType.Q4_0, packed, n, k, x, nthreads)


def gemm_q8_0(packed: np.ndarray, x: np.ndarray, n: int, k: int, nthreads: int | None = None) -> np.ndarray:
    return gemm(WType.Q8_0, packed, n, k, x, nthreads)


def gemm_int4g(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int,
               x: np.ndarray | Q8Activations, nthreads: int | None = None) -> np.ndarray:
    """INT4 with zero points: codes (N, K/2) uint8 (Q4_0 nibble order), scales f32 / zeros u8 (N, K/group)."""
    _load()
    codes = np.ascontiguousarray(codes, np.uint8)
    scales = np.ascontiguousarray(scales, np.float32)
    zeros = np.ascontiguousarray(zeros, np.uint8)
    if group % QK8 or k % group or codes.size != n * k // 2 or scales.size != n * k // group or zeros.size != scales.size:
        raise ValueError(f"INT4 g{group} arrays do not match shape ({n}, {k})")
    act = _as_act(x)
    if _use_numpy:
        return numpy_ref.gemm_int4g(codes, scales, zeros, group, n, k, act)
    m = act.qs.shape[0]
    y = np.empty((m, n), np.float32)
    rc = _lib.qk_gemm_int4g(_ptr(codes), _ptr(scales), _ptr(zeros), group, n, k, _ptr(act.qs), _ptr(act.d),
                            _ptr(act.sums), m, _ptr(y), _threads(nthreads))
    if rc != 0:
        raise ValueError("qk_gemm_int4g rejected its arguments")
    return y


def _int4g_arrays(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int):
    codes = np.ascontiguousarray(codes, np.uint8)
    scales = np.ascontiguousarray(scales, np.float32)
    zeros = np.ascontiguousarray(zeros, np.uint8)
    if group % QK8 or k % group or codes.size != n * k // 2 or scales.size != n * k // group or zeros.size != scales.size:
        raise ValueError(f"INT4 g{group} arrays do not match shape ({n}, {k})")
    return codes, scales, zeros


def repack_int4gx8(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int
                   ) -> np.ndarray:
    """INT4 g`group` arrays -> INT4GX8 bytes (8-row groups for AVX-512 VNNI); C when loaded, same bytes as NumPy."""
    _load()
    codes, scales, zeros = _int4g_arrays(codes, scales, zeros, group, n, k)
    if _lib is None:
        return numpy_ref.repack_int4gx8(codes, scales, zeros, group, n, k)
    out = np.empty(int4gx8_bytes(n, k, group), np.uint8)
    _lib.qk_repack_int4gx8(_ptr(codes), _ptr(scales), _ptr(zeros), group, n, k, _ptr(out))
    return out


def gemm_int4gx8(w: np.ndarray, group: int, n: int, k: int, x: np.ndarray | Q8Activations,
                 nthreads: int | None = None) -> np.ndarray:
    """y (M, N) = W x for INT4GX8 bytes (see repack_int4gx8)."""
    _load()
    w = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if w.size != int4gx8_bytes(n, k, group):
        raise ValueError(f"INT4GX8 g{group} weights of shape ({n}, {k}) need {int4gx8_bytes(n, k, group)} bytes")
    act = _as_act(x)
    if _use_numpy:
        return numpy_ref.gemm_int4gx8(w, group, n, k, act)
    m = act.qs.shape[0]
    y = np.empty((m, n), np.float32)
    rc = _lib.qk_gemm_int4gx8(_ptr(w), group, n, k, _ptr(act.qs), _ptr(act.d), _ptr(act.sums), m, _ptr(y),
                              _threads(nthreads))
    if rc != 0:
        raise ValueError("qk_gemm_int4gx8 rejected its arguments")
    return y


class Int4GLinear:
    """An INT4 g-group weight with zero points in the layout the current path runs fastest: INT4GX8 on
    avx512 (repacked once here, as Q4_0 is), the plain three arrays elsewhere. Calling it runs y = W x."""

    def __init__(self, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, n: int, k: int,
                 nthreads: int | None = None):
        codes, scales, zeros = _int4g_arrays(codes, scales, zeros, group, n, k)
        self.group, self.n, self.k, self.nthreads = group, n, k, nthreads
        self.wtype = WType.INT4GX8 if kernel_path() == "avx512" else WType.INT4G
        if self.wtype == WType.INT4GX8:
            self.arrays: tuple[np.ndarray, ...] = (repack_int4gx8(codes, scales, zeros, group, n, k),)
        else:
            self.arrays = (codes, scales, zeros)

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.arrays)

    def __call__(self, x: np.ndarray | Q8Activations) -> np.ndarray:
        if self.wtype == WType.INT4GX8:
            return gemm_int4gx8(self.arrays[0], self.group, self.n, self.k, x, self.nthreads)
        codes, scales, zeros = self.arrays
        return gemm_int4g(codes, scales, zeros, self.group, self.n, self.k, x, self.nthreads)


def copy_bandwidth(nbytes: int = 256 << 20, nthreads: int | None = None, repeats: int = 5) -> dict[str, float]:
    """Measure this machine's memory bandwidth now: best of `repeats` multithreaded memcpy and read passes
    over buffers far larger than the last-level cache. GB/s = 1e9 bytes/s. `copy_gbs` counts bytes copied
    per second (each is read once and written once, so `copy_rw_gbs` = 2x, the STREAM convention)."""
    import time

    _load()
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros(nbytes, np.uint8)
    best_copy = best_read = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if _lib is not None:
            _lib.qk_copy_mt(_ptr(dst), _ptr(src), nbytes, _threads(nthreads))
        else:
            np.copyto(dst, src)
        best_copy = min(best_copy, time.perf_counter() - t0)
        t0 = time.perf_counter()
        if _lib is not None:
            _lib.qk_read_mt(_ptr(src), nbytes, _threads(nthreads))
        else:
            int(src.view(np.uint64).sum())
        best_read = min(best_read, time.perf_counter() - t0)
    return {"copy_gbs": nbytes / best_copy / 1e9, "copy_rw_gbs": 2 * nbytes / best_copy / 1e9,
            "read_gbs": nbytes / best_read / 1e9}


def _repack(layout: str, w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Plain ggml bytes -> `layout` ("q4_0x2", "q4_0x8", "q8_0x8", "q5_0x8"); C when loaded, the same bytes as NumPy."""
    _load()
    w = np.ascontiguousarray(w).view(np.uint8).reshape(-1)
    if _lib is None:
        return getattr(numpy_ref, f"repack_{layout}")(w, n, k)
    out = np.empty(int(getattr(_lib, f"qk_{layout}_bytes")(n, k)), np.uint8)
    getattr(_lib, f"qk_repack_{layout}")(_ptr(w), n, k, _ptr(out))
    return out


def repack_q4_0x2(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q4_0 bytes -> Q4_0X2 (row pairs interleaved for smmla)."""
    return _repack("q4_0x2", w, n, k)


def repack_q4_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q4_0 bytes -> Q4_0X8 (8-row groups for AVX-512 VNNI)."""
    return _repack("q4_0x8", w, n, k)


def repack_q8_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q8_0 bytes -> Q8_0X8 (8-row groups for AVX-512 VNNI)."""
    return _repack("q8_0x8", w, n, k)


def repack_q5_0x8(w: np.ndarray, n: int, k: int) -> np.ndarray:
    """Q5_0 bytes -> Q5_0X8 (8-row groups for AVX-512 VNNI, bit 4 as byte masks)."""
    return _repack("q5_0x8", w, n, k)


def repacked(wtype: WType, w: np.ndarray, n: int, k: int) -> tuple[WType, np.ndarray]:
    """Weights in the layout the current path runs fastest (Q4_0 -> Q4_0X2 on i8mm, Q4_0/Q8_0/Q5_0 -> *X8 on
    avx512); other types and paths unchanged."""
    wtype = WType(wtype)
    if wtype == WType.Q4_0:
        return repacked_q4_0(w, n, k)
    if wtype == WType.Q8_0 and kernel_path() == "avx512":
        return WType.Q8_0X8, repack_q8_0x8(w, n, k)
    if wtype == WType.Q5_0 and kernel_path() == "avx512":
        return WType.Q5_0X8, repack_q5_0x8(w, n, k)
    return wtype, np.ascontiguousarray(w).view(np.uint8).reshape(-1)


def prefers_repacked() -> bool:
    """True when the path in use has a kernel for a repacked Q4_0 layout (see `repacked_q4_0`)."""
    return kernel_path() in ("i8mm", "avx512")


def repacked_q4_0(w: np.ndarray, n: int, k: int) -> tuple[WType, np.ndarray]:
    """Q4_0 bytes in the layout the current path runs fastest: Q4_0X2 (i8mm), Q4_0X8 (avx512), else as is."""
    path = kernel_path()
    if path == "i8mm":
        return WType.Q4_0X2, repack_q4_0x2(w, n, k)
    if path == "avx512":
        return WType.Q4_0X8, repack_q4_0x8(w, n, k)
    return WType.Q4_0, np.ascontiguousarray(w).view(np.uint8).reshape(-1)
