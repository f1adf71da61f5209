"""Property tests for every registered scheme: error bounds, code ranges, awkward blocks, bad weights.

Error bounds (per weight, stated per family):
- INT grids, Q8_0, Q4_1/Q5_1: half a step of the stored scale, plus what rounding the scale (and Q4_1's
  min) to float16 can add: 2**bits · δ(scale) + δ(min), δ(v) = max(|v|·2⁻¹¹, 2⁻²⁵).
- Q4_0/Q5_0: the same, except a weight at the far end from the block's signed max, whose code clamps
  at 15 (31) as ggml's rule does: one full step there.
- K-quants: the 6-bit sub-scale search may leave the extremes outside the grid, so the bound is
  "the nearest point of the final grid" (ties within float rounding), plus an RMS sanity bound.
- FP8: |w − ŵ| ≤ 2⁻⁴·|w| (half an ulp of 3 mantissa bits) or half the smallest subnormal step × scale.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkiln.errors import QuantizeError
from qkiln.quantize.fp8 import FP8Grid
from qkiln.quantize.ggml_legacy import MinBlock, SymBlock
from qkiln.quantize.int_grid import IntGrid
from qkiln.quantize.kquants import Q2K, Q3K, Q6K, QKMin
from qkiln.quantize.registry import get_scheme, scheme_names
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme, UniformGrid, concat_cols
from qkiln.quantize.tensor import QuantizedTensor

ALL = scheme_names()
KQUANTS = [n for n in ALL if isinstance(get_scheme(n), Q2K | Q3K | QKMin | Q6K)]
FP16_SCALED = [n for n in ALL if not isinstance(get_scheme(n), FP8Grid)]
KINDS = ["normal", "uniform", "outlier", "sparse", "constant", "zeros", "tiny", "ramp", "lognormal"]


def _unit(scheme: Scheme) -> int:
    return scheme.fit_cols or 32


def _make(kind: str, rows: int, cols: int, seed: int, mag: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((rows, cols))
    elif kind == "uniform":
        w = rng.uniform(-1, 1, (rows, cols))
    elif kind == "outlier":
        w = rng.standard_normal((rows, cols)) * 0.01
        w[rng.integers(rows), rng.integers(cols)] = rng.choice([-1.0, 1.0]) * 5.0
    elif kind == "sparse":
        w = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.1)
    elif kind == "constant":
        w = np.full((rows, cols), rng.choice([-1.0, 1.0]) * rng.uniform(0.1, 2))
    elif kind == "zeros":
        w = np.zeros((rows, cols))
    elif kind == "tiny":
        w = rng.standard_normal((rows, cols)) * 1e-30
        mag = 1.0
    elif kind == "ramp":
        w = np.tile(np.linspace(-1, 1, cols), (rows, 1))
    else:
        w = rng.lognormal(0, 2, (rows, cols)) * rng.choice([-1.0, 1.0], (rows, cols))
        # stay inside float16's range, where fp16-scaled grids are defined (huge values: test_huge_values)
        w = np.clip(w, -3e4 / mag, 3e4 / mag)
    return (w * mag).astype(np.float32)


@st.composite
def weights_for(draw: st.DrawFn, scheme: Scheme) -> np.ndarray:
    rows = draw(st.integers(1, 3))
    cols = _unit(scheme) * draw(st.integers(1, 2))
    kind = draw(st.sampled_from(KINDS))
    seed = draw(st.integers(0, 2**32 - 1))
    mag = draw(st.sampled_from([1e-4, 1.0, 30.0, 1000.0]))
    return _make(kind, rows, cols, seed, mag)


def _delta16(v: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(v) * 2.0**-11, 2.0**-25)


def _grid(scheme: Scheme, qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    scale, offset = scheme.affine(qt.params)
    g = scheme.group_index(qt.shape[1])
    return scale[:, g].astype(np.float64), offset[:, g].astype(np.float64)  # (rows, cols) each


def assert_nearest_on_grid(scheme: UniformGrid, w: np.ndarray, qt: QuantizedTensor) -> None:
    """Each decoded weight is the grid point nearest `w` (neighbour codes are no closer)."""
    s, o = _grid(scheme, qt)
    lo, hi = scheme.code_range
    w64 = w.astype(np.float64)
    err = np.abs(qt.dequantize().astype(np.float64) - w64)
    slack = 1e-5 * np.abs(s) + 1e-6 * np.abs(w64) + 1e-37
    for step in (-1, 1):
        nb = np.clip(qt.codes.astype(np.int64) + step, lo, hi)
        val = (nb - scheme.shift) * s + o
        assert np.all(err <= np.abs(val - w64) + slack), f"{scheme.name}: a neighbour code is nearer"


def check_bound(scheme: Scheme, w: np.ndarray, qt: QuantizedTensor) -> None:
    deq = qt.dequantize()
    assert deq.dtype == np.float32 and deq.shape == w.shape
    assert np.isfinite(deq).all(), f"{scheme.name}: non-finite dequantized value"
    err = np.abs(deq.astype(np.float64) - w.astype(np.float64))
    if isinstance(scheme, FP8Grid):
        scale = qt.params["scale"].astype(np.float64)  # (rows, 1)
        sub = 2.0**-10 if scheme.fmt == "e4m3fn" else 2.0**-11  # half the smallest subnormal
        bound = np.maximum(2.0**-4 * np.abs(w), sub * scale) * (1 + 1e-6) + 1e-6 * scale
        assert np.all(err <= bound), f"{scheme.name}: max excess {(err - bound).max()}"
        return
    assert isinstance(scheme, UniformGrid)
    if isinstance(scheme, Q2K | Q3K | QKMin | Q6K):
        assert_nearest_on_grid(scheme, w, qt)
        return
    s, o = _grid(scheme, qt)
    bound = 0.5 * np.abs(s) + 2.0**scheme.bits * _delta16(s) + 1e-5 * np.abs(s) + 1e-6 * np.abs(w)
    if isinstance(scheme, MinBlock):
        bound += _delta16(o)
    if isinstance(scheme, SymBlock):
        top = qt.codes == (1 << scheme.bits) - 1
        bound = np.where(top, bound + 0.5 * np.abs(s), bound)
    assert np.all(err <= bound), (
        f"{scheme.name}: max excess {(err - bound).max()} at {np.argmax(err - bound)}"
    )
    if isinstance(scheme, IntGrid):
        assert_nearest_on_grid(scheme, w, qt)


def check_codes(scheme: Scheme, qt: QuantizedTensor) -> None:
    assert qt.codes.dtype == np.uint8
    lo, hi = scheme.code_range
    assert qt.codes.min() >= lo and qt.codes.max() <= hi
    if isinstance(scheme, FP8Grid):
        assert not np.isin(qt.codes, scheme.nan_codes()).any()


@pytest.mark.parametrize("name", ALL)
def test_roundtrip_within_bound(name: str) -> None:
    scheme = get_scheme(name)

    @given(weights_for(scheme))
    def prop(w: np.ndarray) -> None:
        qt = quantize_rtn(w, scheme, name="t")
        check_codes(scheme, qt)
        check_bound(scheme, w, qt)

    prop()


@pytest.mark.parametrize("name", ALL)
def test_fixed_grid_encode_is_nearest(name: str) -> None:
    """GPTQ's path: params fixed first, codes from `encode` / `encode_affine` on the stored grid."""
    scheme = get_scheme(name)

    @given(weights_for(scheme), st.integers(0, 2**32 - 1))
    def prop(w: np.ndarray, seed: int) -> None:
        params = scheme.fit(w)
        # perturbed weights (as GPTQ's error feedback makes them) on the grid fitted before
        w2 = (w + np.random.default_rng(seed).standard_normal(w.shape) * np.abs(w).max() * 0.05).astype(
            np.float32
        )
        codes = scheme.encode(w2, params)
        qt = QuantizedTensor(scheme, codes, params)
        check_codes(scheme, qt)
        if isinstance(scheme, UniformGrid):
            assert_nearest_on_grid(scheme, w2, qt)
        else:
            scale = params["scale"]
            ref = np.clip(w2 / scale, -scheme.fmax, scheme.fmax).astype(scheme.dtype).view(np.uint8)
            assert np.array_equal(codes, ref)

    prop()


@pytest.mark.parametrize("name", [n for n in ALL if get_scheme(n).fit_cols])
def test_fit_on_column_slices_equals_whole(name: str) -> None:
    """Params of block schemes are per fit unit, so fitting slice by slice (as GPTQ does) changes nothing."""
    scheme = get_scheme(name)
    unit = scheme.fit_cols
    w = _make("normal", 4, unit * 3, 7, 1.0)
    whole = scheme.fit(w)
    parts = concat_cols([scheme.fit(w[:, c : c + unit]) for c in range(0, w.shape[1], unit)])
    assert whole.keys() == parts.keys()
    for k in whole:
        assert whole[k].dtype == parts[k].dtype and np.array_equal(whole[k], parts[k]), k


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -3.5, 1e-30, -1e-30, 1e-8])
def test_constant_zero_tiny_blocks(name: str, value: float) -> None:
    scheme = get_scheme(name)
    w = np.full((3, _unit(scheme) * 2), value, np.float32)
    w[1, : _unit(scheme)] = 0.0  # a zero block next to a constant one
    qt = quantize_rtn(w, scheme, name="blk")
    check_codes(scheme, qt)
    check_bound(scheme, w, qt)
    assert np.all(qt.dequantize()[1, : _unit(scheme)] == 0)


@pytest.mark.parametrize("name", ALL)
def test_huge_values(name: str) -> None:
    """1e30 cannot sit under a float16 scale: a clear error naming the tensor; FP8's float32 scale copes."""
    scheme = get_scheme(name)
    w = _make("normal", 2, _unit(scheme), 3, 1e30)
    if name in FP16_SCALED:
        with pytest.raises(QuantizeError, match=r"^model\.layers\.3\.mlp\.up_proj\.weight: .*float16"):
            quantize_rtn(w, scheme, name="model.layers.3.mlp.up_proj.weight")
    else:
        qt = quantize_rtn(w, scheme, name="t")
        check_codes(scheme, qt)
        check_bound(scheme, w, qt)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_names_the_tensor(name: str, bad: float) -> None:
    scheme = get_scheme(name)
    w = _make("normal", 3, _unit(scheme), 5, 1.0)
    w[2, 7] = bad
    with pytest.raises(
        QuantizeError, match=r"^model\.layers\.0\.self_attn\.q_proj\.weight: .*row 2, column 7"
    ):
        quantize_rtn(w, scheme, name="model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize(
    ("name", "limit"), [("q2_k", 0.32), ("q3_k", 0.16), ("q4_k", 0.1), ("q5_k", 0.05), ("q6_k", 0.025)]
)
def test_kquant_rms_error(name: str, limit: float) -> None:
    """K-quants are better than their bit width's uniform grid; a broken search would not be."""
    w = _make("normal", 64, 512, 11, 1.0)
    qt = quantize_rtn(w, get_scheme(name))
    rms = float(np.sqrt(np.mean((qt.dequantize() - w) ** 2)))
    assert rms < limit, rms


def test_int4_conventions() -> None:
    """Symmetric: zero point 8 and scale amax/7.5; asymmetric: integer zero point in 0..15 (GPTQ layout)."""
    w = np.array([[-3.0, 1.0, 0.5, 2.0] * 8], np.float32)  # (1, 32)
    sym = quantize_rtn(w, get_scheme("int4_g32"))
    assert sym.params["scale"].dtype == np.float16
    assert sym.params["scale"][0, 0] == np.float16(3.0 / 7.5)
    assert sym.codes[0, 0] == 8 + round(-3.0 / float(np.float16(0.4)))
    asym = quantize_rtn(w, get_scheme("int4_g32_asym"))
    assert asym.params["zero"].dtype == np.uint8 and 0 <= asym.params["zero"][0, 0] <= 15
    assert asym.params["scale"][0, 0] == np.float16(5.0 / 15)
    assert asym.params["zero"][0, 0] == 9  # round(3 / (5/15))
    assert abs(asym.dequantize()).max() <= 3.0 + 1e-3


def test_param_shapes_documented() -> None:
    w = _make("normal", 5, 512, 1, 1.0)
    expect = {
        "int4_g64": {"scale": ((5, 8), np.float16)},
        "int4_pc_asym": {"scale": ((5, 1), np.float16), "zero": ((5, 1), np.uint8)},
        "q4_0": {"d": ((5, 16), np.float16)},
        "q5_1": {"d": ((5, 16), np.float16), "m": ((5, 16), np.float16)},
        "q4_k": {
            "d": ((5, 2), np.float16),
            "dmin": ((5, 2), np.float16),
            "scales": ((5, 16), np.uint8),
            "mins": ((5, 16), np.uint8),
        },
        "q6_k": {"d": ((5, 2), np.float16), "scales": ((5, 32), np.int8)},
        "q3_k": {"d": ((5, 2), np.float16), "scales": ((5, 32), np.int8)},
        "q2_k": {
            "d": ((5, 2), np.float16),
            "dmin": ((5, 2), np.float16),
            "scales": ((5, 32), np.uint8),
            "mins": ((5, 32), np.uint8),
        },
        "fp8_e4m3fn_pt": {"scale": ((5, 1), np.float32)},
    }
    for name, shapes in expect.items():
        qt = quantize_rtn(w, get_scheme(name))
        assert {k: (v.shape, v.dtype) for k, v in qt.params.items()} == shapes, name
    q4k = quantize_rtn(w, get_scheme("q4_k"))
    assert q4k.params["scales"].max() <= 63 and q4k.params["mins"].max() <= 63
