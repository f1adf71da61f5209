"""GPTQ on a small random linear with correlated inputs: lower output error than RTN on the same grid,
codes that are exactly the target format's (re-encoding the dequantized weights gives the same codes)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from qkiln.errors import QuantizeError
from qkiln.quantize.gptq import gptq_quantize, output_error, prepare_hessian
from qkiln.quantize.hessian import accumulate_hessian, empty_hessian
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn

OUT, IN, TOKENS = 96, 256, 2048


@pytest.fixture(scope="module")
def problem() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W (out, in), X (tokens, in) with correlated channels of very different magnitudes, H."""
    rng = np.random.default_rng(0)
    mix = np.eye(IN, dtype=np.float32) + 0.3 * rng.standard_normal((IN, IN)).astype(np.float32)
    gains = (0.1 + 3 * rng.random(IN)).astype(np.float32)
    x = (rng.standard_normal((TOKENS, IN)).astype(np.float32) @ mix) * gains  # (tokens, in)
    w = (0.05 * rng.standard_normal((OUT, IN))).astype(np.float32)
    h, n = accumulate_hessian(*empty_hessian(IN), x)
    assert n == TOKENS
    return w, x, h


def test_hessian_is_running_mean_of_2xtx(problem):
    _, x, h = problem
    np.testing.assert_allclose(h, 2 * x.astype(np.float64).T @ x / len(x), rtol=1e-5, atol=1e-4)
    # two halves give the same running mean, and the input is not modified (pure)
    h0, n0 = empty_hessian(IN)
    h1, n1 = accumulate_hessian(h0, n0, x[:700])
    h2, n2 = accumulate_hessian(h1, n1, x[700:])
    assert n2 == TOKENS and not h0.any()
    np.testing.assert_allclose(h2, h, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("scheme_name", ["q4_0", "int4_g64_asym", "int4_g32", "q8_0", "int4_pc", "fp8_e4m3fn_pc"])
@pytest.mark.parametrize("grid", ["original", "updated"])
def test_gptq_beats_rtn_and_fits_grid(problem, scheme_name, grid):
    w, x, h = problem
    scheme = get_scheme(scheme_name)
    rtn = quantize_rtn(w, scheme).dequantize()
    qt = gptq_quantize(w, h, scheme, block_size=64, grid=grid, name="t")
    wq = qt.dequantize()
    err_rtn = np.linalg.norm(x @ (w - rtn).T)
    err_gptq = np.linalg.norm(x @ (w - wq).T)
    assert err_gptq < 0.85 * err_rtn, (err_gptq, err_rtn)
    # exactly on the format's grid: re-encoding the dequantized weights gives the same codes
    np.testing.assert_array_equal(scheme.encode(wq, qt.params), qt.codes)
    assert qt.codes.shape == w.shape


@pytest.mark.parametrize("scheme_name", ["q4_0", "int4_g64_asym"])
def test_act_order_runs_and_helps(problem, scheme_name):
    w, _, h = problem
    scheme = get_scheme(scheme_name)
    plain = gptq_quantize(w, h, scheme, block_size=64)
    ordered = gptq_quantize(w, h, scheme, block_size=64, act_order=True)
    np.testing.assert_array_equal(scheme.encode(ordered.dequantize(), ordered.params), ordered.codes)
    e_plain = output_error(w, plain.dequantize(), h)
    e_ordered = output_error(w, ordered.dequantize(), h)
    assert e_ordered < e_plain * 1.05  # on gains this uneven act-order is at least as good
    assert e_ordered < output_error(w, quantize_rtn(w, scheme).dequantize(), h)


def test_dead_columns_keep_rtn_codes(problem):
    w, x, _ = problem
    x = x.copy()
    x[:, :32] = 0  # first 32 inputs never active
    h, _ = accumulate_hessian(*empty_hessian(IN), x)
    scheme = get_scheme("q4_0")
    qt = gptq_quantize(w, h, scheme, grid="original")
    # nearest codes on the fixed grid (ggml's RTN rounds with the unrounded scale, so compare to encode)
    np.testing.assert_array_equal(qt.codes[:, :32], scheme.encode(w, qt.params)[:, :32])
    assert np.isfinite(qt.dequantize()).all()


def test_block_size_does_not_change_the_math(problem):
    w, _, h = problem
    scheme = get_scheme("int4_g64_asym")
    a = gptq_quantize(w, h, scheme, block_size=32).dequantize()
    b = gptq_quantize(w, h, scheme, block_size=256).dequantize()
    # lazy batch updates are an exact reordering of the same sums (float32 rounding only)
    assert np.mean(a != b) < 0.01


def test_singular_hessian_retries_with_more_damping(caplog):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((8, 64)).astype(np.float32)  # rank 8 < 64
    h, _ = accumulate_hessian(*empty_hessian(64), x)
    h[0, 1] = h[1, 0] = 20 * np.diag(h).mean()  # indefinite until damping is ~20x
    with caplog.at_level(logging.WARNING, logger="qkiln.quantize.gptq"):
        prep = prepare_hessian(h, damp=0.01, name="t")
    upper, used = prep.hinv, prep.damp
    assert used > 0.01 and "retrying" in caplog.text
    np.testing.assert_allclose(np.triu(upper), upper)


def test_bad_inputs_are_clear_errors(problem):
    w, _, h = problem
    bad = w.copy()
    bad[3, 5] = np.nan
    with pytest.raises(QuantizeError, match=r"lin.*NaN"):
        gptq_quantize(bad, h, get_scheme("q4_0"), name="lin")
    with pytest.raises(QuantizeError, match="not a multiple"):
        gptq_quantize(w[:, :96], h[:96, :96], get_scheme("int4_g64"), name="lin")


def test_stacked_rows_equal_separate_matrices(problem):
    """q/k/v are scanned as one stacked matrix: GPTQ is row-separable given H, so results must match."""
    from qkiln.quantize.gptq import gptq_quantize_shared

    w, _, h = problem
    scheme = get_scheme("int4_g64_asym")
    prep = prepare_hessian(h, act_order=True)
    parts = {"a": w[:40], "b": w[40:]}
    joint = gptq_quantize_shared(parts, prep, scheme, block_size=64)
    for n, wp in parts.items():
        alone = gptq_quantize(wp, prep, scheme, block_size=64)
        assert np.mean(joint[n].codes != alone.codes) < 0.002  # float32 summation order only
        np.testing.assert_array_equal(scheme.encode(joint[n].dequantize(), joint[n].params), joint[n].codes)


@pytest.mark.parametrize("scheme_name", ["q4_0", "q5_0", "q4_k", "int4_g32_asym", "int4_g64", "int8"])
def test_weighted_fit_lowers_output_error(scheme_name):
    """Fitting each block's params with the mean squared activation as importance (llama.cpp's imatrix
    rule for ggml grids; an importance-weighted range search for integer grids) beats the plain RTN fit
    under GPTQ when input channels differ widely in magnitude."""
    scheme = get_scheme(scheme_name)
    for seed in range(3):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((2048, IN)).astype(np.float32) * np.exp(rng.normal(0, 1, IN)).astype(np.float32)
        w = rng.standard_normal((64, IN)).astype(np.float32)
        h, _ = accumulate_hessian(*empty_hessian(IN), x)
        plain, weighted = (gptq_quantize(w, h, scheme, weighted_fit=f) for f in (False, True))
        assert scheme.encode(weighted.dequantize(), weighted.params).tolist() == weighted.codes.tolist()
        assert output_error(w, weighted.dequantize(), h) < 0.9 * output_error(w, plain.dequantize(), h)



def test_unweighted_int_fit_is_min_max(problem):
    """Without importance the integer grids keep the layouts' plain min/max rule (what RTN means)."""
    w, _, _ = problem
    scheme = get_scheme("int4_g32_asym")
    blocks = w.reshape(w.shape[0], -1, 32)
    lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    np.testing.assert_array_equal(scheme.fit(w)["scale"], ((hi - lo) / 15).astype(np.float16))


def test_prepared_in_place_equals_prepared_from_a_copy_and_inverts_h(problem):
    """`overwrite=True` factors calibration's float32 Hessian in its own buffer (no copy at 14336 inputs): the same
    U as from a copy, with UᵀU = (H + λI)⁻¹ under the act-order permutation, zeros below the diagonal."""
    _, _, h = problem
    h32 = np.ascontiguousarray(h, dtype=np.float32)
    copy = prepare_hessian(h32, act_order=True)
    owned = h32.copy()
    inplace = prepare_hessian(owned, act_order=True, overwrite=True)
    assert inplace.hinv is owned
    np.testing.assert_array_equal(inplace.hinv, copy.hinv)
    np.testing.assert_array_equal(inplace.perm, copy.perm)
    u = inplace.hinv.astype(np.float64)
    np.testing.assert_array_equal(np.triu(u), u)
    hp = h[np.ix_(inplace.perm, inplace.perm)].astype(np.float64)
    want = np.linalg.inv(hp + 0.01 * np.mean(np.diag(h)) * np.eye(len(hp)))
    np.testing.assert_allclose(u.T @ u, want, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("n", [1, 2, 5, 300, 513])
def test_triangle_moves_in_place(n):
    from qkiln.quantize.gptq import _flip_lower_to_upper, _permute_symmetric, _restore_lower

    rng = np.random.default_rng(n)
    a = rng.standard_normal((n, n)).astype(np.float32)
    a = a + a.T
    order = rng.permutation(n)
    b = a.copy()
    _permute_symmetric(b, order)
    np.testing.assert_array_equal(b, a[np.ix_(order, order)])
    c = a.copy()
    c[np.tril_indices(n, -1)] = 7.0  # what potrf leaves below: garbage; the upper triangle still holds a
    _restore_lower(c)
    np.testing.assert_array_equal(c, a)
    d = a.copy()
    _flip_lower_to_upper(d)
    np.testing.assert_array_equal(d, np.tril(a)[::-1, ::-1])


def test_row_blocks_of_the_stack_equal_one_scan(problem):
    """`gptq_quantize_shared` scans a block of rows at a time (an 8B model's gate/up is 0.5 GB per float32 copy):
    rows are independent given H, so the codes equal one scan of the whole stack up to float32 summation order."""
    from qkiln.quantize.gptq import gptq_quantize_shared

    w, _, h = problem
    scheme = get_scheme("int4_g64_asym")
    prep = prepare_hessian(h, act_order=True)
    parts = {"a": w[:40], "b": w[40:]}
    whole = gptq_quantize_shared(parts, prep, scheme, block_size=64)
    blocks = gptq_quantize_shared(parts, prep, scheme, block_size=64, row_floats=13 * w.shape[1])  # 13 rows, across a|b
    for n in parts:
        assert np.mean(whole[n].codes != blocks[n].codes) < 0.002
        np.testing.assert_array_equal(scheme.encode(blocks[n].dequantize(), blocks[n].params), blocks[n].codes)
