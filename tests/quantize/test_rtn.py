"""RTN driver: chunking and threads never change the result; bad inputs are one clear QuantizeError."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qkiln.errors import QuantizeError
from qkiln.quantize.registry import get_scheme, scheme_names
from qkiln.quantize.rtn import quantize_rtn


@pytest.mark.parametrize("name", scheme_names())
def test_chunks_and_workers_do_not_change_result(name: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal((37, 512)).astype(np.float32)
    a = quantize_rtn(w, get_scheme(name), chunk_elems=1 << 20, workers=1)
    b = quantize_rtn(w, get_scheme(name), chunk_elems=1024, workers=2)  # 2 rows per chunk
    assert np.array_equal(a.codes, b.codes)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k]), k


def test_bf16_and_f16_inputs() -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    for dt in (np.float16, ml_dtypes.bfloat16):
        low = w.astype(dt)
        a = quantize_rtn(low, get_scheme("q4_0"))
        b = quantize_rtn(low.astype(np.float32), get_scheme("q4_0"))
        assert np.array_equal(a.codes, b.codes)


def test_result_carries_name_and_shape() -> None:
    qt = quantize_rtn(np.ones((4, 64), np.float32), get_scheme("int4_g32"), name="lm_head.weight")
    assert qt.name == "lm_head.weight" and qt.shape == (4, 64)


def test_group_not_dividing_row_is_an_error() -> None:
    w = np.zeros((4, 576), np.float32)
    with pytest.raises(
        QuantizeError, match=r"^model\.layers\.0\.mlp\.up_proj\.weight: row length 576 .* 128"
    ):
        quantize_rtn(w, get_scheme("int4_g128"), name="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(QuantizeError, match="not a multiple of q4_k's block of 256"):
        quantize_rtn(w, get_scheme("q4_k"), name="x")


def test_not_2d_is_an_error() -> None:
    with pytest.raises(QuantizeError, match="2-D"):
        quantize_rtn(np.zeros(64, np.float32), get_scheme("q8_0"), name="norm.weight")


def test_unknown_scheme_lists_valid_names() -> None:
    with pytest.raises(QuantizeError) as e:
        get_scheme("q4_k_x")
    msg = str(e.value)
    assert "unknown scheme 'q4_k_x'" in msg and "\n" not in msg
    for n in scheme_names():
        assert n in msg


def test_aliases_and_case() -> None:
    assert get_scheme("Q4_0").name == "q4_0"
    assert get_scheme("fp8_e4m3fn").name == "fp8_e4m3fn_pc"


def test_first_bad_element_is_reported_across_chunks() -> None:
    w = np.zeros((50, 64), np.float32)
    w[41, 3] = np.inf
    with pytest.raises(QuantizeError, match=r"^t: inf at row 41, column 3"):
        quantize_rtn(w, get_scheme("q4_0"), name="t", chunk_elems=640, workers=1)
