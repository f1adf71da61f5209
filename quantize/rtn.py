"""Round-to-nearest: each scheme's reference rule applied to a whole matrix, in row chunks.

Memory: one chunk of about CHUNK_ELEMS float32 weights (plus the scheme's temporaries, a few times
that) on top of the input and the uint8 codes — never a float64 or full-size float32 copy.
"""

from __future__ import annotations

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.scheme import Params, Scheme, concat_rows, slice_rows
from qkiln.quantize.tensor import QuantizedTensor

CHUNK_ELEMS = 1 << 20


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
    w: np.ndarray,
    scheme: Scheme,
    *,
    name: str = "",
    importance: np.ndarray | None = None,
    chunk_elems: int = CHUNK_ELEMS,
) -> QuantizedTensor:
    """Quantize `w` (out_features, in_features) on `scheme` by round-to-nearest."""
    w = np.asarray(w)
    tensor = name or "weight"
    scheme.check_shape(w.shape, tensor)
    rows, cols = w.shape
    step = max(1, chunk_elems // max(cols, 1))
    codes = np.empty((rows, cols), np.uint8)  # (rows, cols)
    whole: Params | None = None
    try:
        if scheme.per_tensor:
            for r0 in range(0, rows, step):
                check_finite(w[r0 : r0 + step].astype(np.float32, copy=False), tensor, r0)
            whole = scheme.fit(w.astype(np.float32, copy=False), importance)
        parts: list[Params] = []
        for r0 in range(0, rows, step):
            chunk = w[r0 : r0 + step].astype(np.float32, copy=False)  # (≤step, cols)
            if whole is None:
                check_finite(chunk, tensor, r0)
                codes[r0 : r0 + step], params = scheme.quantize(chunk, importance)
                parts.append(params)
            else:
                codes[r0 : r0 + step] = scheme.encode(chunk, slice_rows(whole, r0, r0 + step))
    except QuantizeError as e:
        if str(e).startswith(f"{tensor}:"):
            raise
        raise QuantizeError(f"{tensor}: {e}") from None
    params = whole if whole is not None else concat_rows(parts)
    return QuantizedTensor(scheme, codes, params, name)
