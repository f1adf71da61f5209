"""Round-to-nearest: each scheme's reference rule applied to a whole matrix, in row chunks.

Memory: `workers` chunks of about CHUNK_ELEMS float32 weights (plus the scheme's temporaries, a few
times that) on top of the input and the uint8 codes — never a float64 or full-size float32 copy, and with
a checkpoint's `LazyRows` as input not even the input: each chunk is read from disk as it is quantized.
Chunks are independent and NumPy releases the GIL in its loops, so they run on a small thread pool;
the result does not depend on the number of workers.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.model.source import LazyRows
from qkiln.quantize.scheme import Params, Scheme, concat_rows, slice_rows
from qkiln.quantize.tensor import QuantizedTensor

CHUNK_ELEMS = 1 << 16  # 256 KiB of float32: the scheme's temporaries stay in cache (measured fastest)


def check_finite(w: np.ndarray, name: str, r0: int = 0) -> None:
    """QuantizeError naming the tensor and the first bad element if `w` holds NaN or Inf."""
    bad = ~np.isfinite(w)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise QuantizeError(
            f"{name or 'weight'}: {w[r, c]} at row {r0 + r}, column {c}; a weight must be finite — "
            f"the checkpoint is corrupt or overflowed, fix it before quantizing"
        )


def quantize_rtn(
    w: np.ndarray | LazyRows,
    scheme: Scheme,
    *,
    name: str = "",
    importance: np.ndarray | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    workers: int | None = None,
) -> QuantizedTensor:
    """Quantize `w` (out_features, in_features) on `scheme` by round-to-nearest. `w` may be a checkpoint's
    `LazyRows`: each chunk is read from disk when it is quantized (no float32 copy of the whole tensor)."""
    if not isinstance(w, LazyRows):
        w = np.asarray(w)
    tensor = name or "weight"
    scheme.check_shape(w.shape, tensor)
    rows, cols = w.shape
    step = max(1, chunk_elems // max(cols, 1))
    codes = np.empty((rows, cols), np.uint8)  # (rows, cols)
    whole: Params | None = None
    starts = range(0, rows, step)
    n_workers = max(1, min(workers or os.cpu_count() or 1, 4, len(starts)))

    def run(r0: int) -> Params | None:
        chunk = w[r0 : r0 + step].astype(np.float32, copy=False)  # (≤step, cols)
        if whole is not None:
            codes[r0 : r0 + step] = scheme.encode(chunk, slice_rows(whole, r0, r0 + step))
            return None
        check_finite(chunk, tensor, r0)
        codes[r0 : r0 + step], params = scheme.quantize(chunk, importance)
        return params

    try:
        if scheme.per_tensor:
            for r0 in starts:
                check_finite(w[r0 : r0 + step].astype(np.float32, copy=False), tensor, r0)
            whole = scheme.fit(w, importance)  # per-tensor fits read `w` in row chunks themselves
        if n_workers == 1:
            results = [run(r0) for r0 in starts]
        else:
            with ThreadPoolExecutor(n_workers) as pool:
                results = list(pool.map(run, starts))
    except QuantizeError as e:
        if str(e).startswith(f"{tensor}:"):
            raise
        raise QuantizeError(f"{tensor}: {e}") from None
    parts = [p for p in results if p is not None]
    params = whole if whole is not None else concat_rows(parts)
    return QuantizedTensor(scheme, codes, params, name)
