"""What the C-kernel wrappers with their own entry points (attention, element-wise, GPTQ loops) share:
loading the kernel library once with their ctypes signatures, the variant QKILN_KERNEL asks for, and the
rule for writing a result into a caller's `out` array."""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Any

import numpy as np

from qkiln.kernels.api import ALL_PATHS, ENV, KernelError
from qkiln.kernels.build import BuildError, build_library


class LazyLibrary:
    """The kernel library kernels.api loads (QKILN_KERNELS_LIB or the cached build), with `signatures`
    (name -> argtypes; every function returns int) declared on first use; None when it cannot be had."""

    def __init__(self, signatures: dict[str, list[Any]]):
        self.signatures = signatures
        self.error: str | None = None
        self._lib: Any = None
        self._loaded = False
        self._lock = threading.Lock()

    def load(self) -> Any:
        if self._loaded:  # every call asks: skip the lock once loaded
            return self._lib
        with self._lock:
            if not self._loaded:
                try:
                    lib = ctypes.CDLL(os.environ.get("QKILN_KERNELS_LIB") or str(build_library()))
                    for name, args in self.signatures.items():
                        fn = getattr(lib, name)
                        fn.restype = ctypes.c_int
                        fn.argtypes = args
                    self._lib = lib
                except (BuildError, OSError, AttributeError) as e:
                    self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._loaded = True
            return self._lib


def env_variant() -> str | None:
    """The variant QKILN_KERNEL asks for: None = NumPy, else 'auto', 'avx512' or 'portable'."""
    want = os.environ.get(ENV, "").strip().lower()
    if want and want not in ALL_PATHS:
        raise KernelError(f"{ENV}={want!r} is not a kernel path; use one of {', '.join(ALL_PATHS)}")
    if want == "numpy":
        return None
    if want in ("", "avx512"):
        return "auto" if not want else "avx512"
    return "portable"


def fits_out(out: np.ndarray, shape: tuple[int, ...], dtypes: tuple[Any, ...] = (np.float32,)) -> bool:
    """`out` can take a C function's result directly: that shape, one of `dtypes`, C-contiguous, writable."""
    return out.shape == shape and out.dtype in dtypes and out.flags.c_contiguous and out.flags.writeable


def into(got: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    """A result made elsewhere (the NumPy fallback), copied into `out` when one was given."""
    if out is None:
        return got
    out[...] = got
    return out
