"""Every BLAS call of calibration on one thread per caller.

Calibration runs its batches, scale searches and clip searches on a pool of threads of its own, each making
BLAS calls (NumPy's matmul, scipy's LAPACK); OpenBLAS threading them again would oversubscribe the cores, and
its threaded syrk and potrf sum in an order that depends on the thread count, so the bytes of an artifact would
depend on the machine (seen: a Ray worker, OMP_NUM_THREADS=1, gave other codes than its driver). The modules
that call BLAS enter `one_blas_thread()` around that work — quantize's, and the kernels' own NumPy Gram
(`kernels.bf16`, a syrk), hence its place in the kernels' layer.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any


@functools.cache
def _blas_controller() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        return None
    # scipy's wheels carry their own OpenBLAS (its LAPACK and syrk run GPTQ's Hessians): loaded before the
    # controller looks, or it is not limited — and its threaded results depend on the thread count
    import scipy.linalg  # noqa: F401
    return ThreadpoolController()  # inspecting the loaded libraries costs ~0.1 s: once per process


def one_blas_thread() -> contextlib.AbstractContextManager[object]:
    """Every BLAS (NumPy's and scipy's) on one thread: OpenBLAS's threaded potrf is ~15x slower than one thread on
    a busy 2-core machine (measured), and a threaded syrk/potrf sums in an order that depends on the thread count
    (the same build on another machine gave other bytes)."""
    ctl = _blas_controller()
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")
