"""QuantizedTensor.take_rows: a row subset decodes to the same values as those rows of the whole tensor
(calibration decodes only the embedding rows its tokens use)."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn


@pytest.mark.parametrize("name", ["int4_g64_asym", "int8", "q4_0", "q4_k", "q6_k", "fp8_e4m3fn_pc", "fp8_e4m3fnuz_pt"])
def test_take_rows_decodes_like_the_whole_tensor(name):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 256)).astype(np.float32)
    scheme = get_scheme(name)
    qt = quantize_rtn(w, scheme)
    rows = np.array([7, 0, 39, 7, 12])
    part = qt.take_rows(rows)
    assert part.shape == (5, 256) and part.scheme is scheme
    np.testing.assert_array_equal(part.dequantize(), qt.dequantize()[rows])
