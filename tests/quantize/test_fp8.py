"""FP8 grids: casts identical to ml_dtypes, clamping instead of NaN, E4M3FNUZ's missing -0."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn

FP8 = {"fp8_e4m3fn_pc": ml_dtypes.float8_e4m3fn, "fp8_e4m3fnuz_pc": ml_dtypes.float8_e4m3fnuz}
FP8_ALL = ["fp8_e4m3fn_pc", "fp8_e4m3fn_pt", "fp8_e4m3fnuz_pc", "fp8_e4m3fnuz_pt"]
finite32 = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@pytest.mark.parametrize("name", list(FP8))
def test_codes_are_ml_dtypes_casts(name: str) -> None:
    dtype = FP8[name]
    scheme = get_scheme(name)

    @given(arrays(np.float32, (3, 40), elements=finite32))
    def prop(w: np.ndarray) -> None:
        qt = quantize_rtn(w, scheme)
        scale = qt.params["scale"]  # (rows, 1) float32
        amax = np.abs(w).max(axis=1, keepdims=True)
        assert np.array_equal(scale, np.where(amax > 0, amax / np.float32(scheme.fmax), 1).astype(np.float32))
        ref = np.clip(w / scale, -scheme.fmax, scheme.fmax).astype(dtype).view(np.uint8)
        assert np.array_equal(qt.codes, ref)
        assert np.array_equal(qt.dequantize(), ref.view(dtype).astype(np.float32) * scale)

    prop()


def test_format_constants() -> None:
    assert get_scheme("fp8_e4m3fn").fmax == 448.0
    assert get_scheme("fp8_e4m3fnuz").fmax == 240.0


@pytest.mark.parametrize("name", FP8_ALL)
def test_overflow_clamps_instead_of_nan(name: str) -> None:
    """ml_dtypes casts 449 to NaN; a fixed grid (GPTQ's path) clamps to ±max instead."""
    scheme = get_scheme(name)
    w = np.array([[1.0, -1.0, 0.5, 0.25]], np.float32)
    params = scheme.fit(w)
    codes = scheme.encode(w * 10, params)  # 10x outside the fitted range
    values = scheme.values(codes)
    assert np.isfinite(values).all()
    assert values[0, 0] == scheme.fmax and values[0, 1] == -scheme.fmax


@pytest.mark.parametrize("name", ["fp8_e4m3fnuz_pc", "fp8_e4m3fnuz_pt"])
def test_e4m3fnuz_never_nan_pattern(name: str) -> None:
    """0x80 is E4M3FNUZ's NaN: -0.0 and negatives that round to zero must give 0x00."""
    scheme = get_scheme(name)
    w = np.array([[-0.0, -1e-30, -1e-6, 0.0, 1.0, -1.0, -1e-4, 3e-4] * 4], np.float32)
    qt = quantize_rtn(w, scheme)
    assert not (qt.codes == 0x80).any()
    codes = scheme.encode_affine(w, np.float32(1.0), np.float32(0.0))  # tiny negatives on a unit scale
    assert not (codes == 0x80).any()

    @given(arrays(np.float32, (2, 33), elements=finite32))
    def prop(x: np.ndarray) -> None:
        assert not (quantize_rtn(x, scheme).codes == 0x80).any()

    prop()


def test_per_tensor_scale_is_global() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 64)).astype(np.float32)
    w[123, 5] = 40.0
    qt = quantize_rtn(w, get_scheme("fp8_e4m3fn_pt"), chunk_elems=640)  # 10 rows per chunk
    assert np.all(qt.params["scale"] == np.float32(40.0) / np.float32(448))
