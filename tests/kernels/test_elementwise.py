"""The C element-wise kernels against the NumPy functions they replace (kernels.reference.rms_norm, silu_mul,
apply_rope), on the inputs the runtime and calibration give them: odd sizes, the strided
column slices of the fused qkv / gate_up products, saturating gates, zeros, inf and NaN; the tolerances
are the ones kernels.elementwise states (RoPE: bit for bit); both C variants give the same bits; the
NumPy fallback is taken when asked or when the library is missing.
"""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.kernels import elementwise as ew
from qkiln.kernels.api import KernelError
from qkiln.kernels.reference import apply_rope as np_apply_rope
from qkiln.kernels.reference import rms_norm as np_rms_norm
from qkiln.kernels.reference import silu_mul as np_silu_mul
from qkiln.runtime.rope import RopeTable

if ew.variant_name() == "numpy":
    pytest.skip("the C kernel library cannot be built here", allow_module_level=True)

# QKILN_KERNEL value -> variant: any C path other than avx512 selects the portable variant
ENV_OF = {"portable": "scalar", "avx512": "avx512"}
VARIANTS = ["portable"] + (["avx512"] if ew.variant_name() == "avx512" else [])


@pytest.fixture(params=VARIANTS)
def variant(request, monkeypatch):
    monkeypatch.setenv("QKILN_KERNEL", ENV_OF[request.param])
    return request.param


def _same_nonfinite(got, ref):
    """Non-finite results in the same places with the same values (NaN where NumPy has NaN)."""
    bad = ~np.isfinite(ref)
    assert np.array_equal(bad, ~np.isfinite(got))
    np.testing.assert_array_equal(got[bad], ref[bad])


def _check_rms(x, w, eps=1e-5):
    got, ref = ew.rms_norm(x, w, eps), np_rms_norm(x, w, eps)
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    _same_nonfinite(got, ref)
    fin = np.isfinite(ref)
    err = np.abs(got[fin].astype(np.float64) - ref[fin])
    assert (err <= ew.RMS_RTOL * np.abs(ref[fin])).all(), float((err / np.maximum(np.abs(ref[fin]), 1e-30)).max())
    return got


@pytest.mark.parametrize("t", [1, 3, 4096])
@pytest.mark.parametrize("n", [1, 7, 576, 1000])
def test_rms_norm_matches_numpy(variant, t, n):
    rng = np.random.default_rng(t * 1000 + n)
    x = (rng.standard_normal((t, n)) * rng.uniform(0.01, 100, (t, 1))).astype(np.float32)  # (t, n)
    w = rng.standard_normal(n).astype(np.float32)  # (n,)
    _check_rms(x, w)


def test_rms_norm_strided_rows_zeros_and_nonfinite(variant):
    rng = np.random.default_rng(1)
    big = rng.standard_normal((9, 1200)).astype(np.float32)  # (t, wider)
    x = big[:, 100:676]  # (9, 576) view, row stride 1200
    x[1] = 0.0  # ms = 0: r = 1/sqrt(eps)
    x[2, 5] = np.nan  # the whole row NaN
    x[3, 7] = np.inf  # ms = inf: r = 0, inf * 0 = NaN, the rest 0
    x[4] = 1e30  # squares overflow: NumPy's float32 sum is inf; the float64 sum rounds to inf as well
    w = rng.standard_normal(576).astype(np.float32)
    got = ew.rms_norm(x, w, 1e-5)
    with np.errstate(invalid="ignore"):
        ref = np_rms_norm(x, w, 1e-5)
    assert not np.isfinite(ref[2]).any() and not np.isfinite(got[2]).any()
    np.testing.assert_array_equal(got[3:5], ref[3:5])  # NaN at the inf, zeros elsewhere (r = 0)
    rows = [0, 1, 5, 6, 7, 8]  # the ordinary rows, and the zero row, within the stated tolerance
    err = np.abs(got[rows].astype(np.float64) - ref[rows])
    assert (err <= ew.RMS_RTOL * np.abs(ref[rows])).all()


def test_rms_norm_bfloat16_out_is_the_float32_result_rounded(variant):
    """A bfloat16 `out` holds exactly round_bf16 of the float32 result: denormals flushed, ties to even,
    overflow to inf, NaN quiet (the rule of the AMX products that read it)."""
    from qkiln.kernels.bf16 import BF16, round_bf16

    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 576)).astype(np.float32)
    x[0, :5] = [1e-39, -1e-39, 3e38, -3e38, 0.0]
    x[1] *= np.float32(1e-20)
    x[2, 3] = np.nan
    w = rng.standard_normal(576).astype(np.float32)
    w[7], w[8], w[9] = np.inf, np.float32(1e-30), np.float32(3e38)
    w[10:20] = (np.arange(10, dtype=np.float32) + 0.5) * np.float32(2**-8)  # exact-tie candidates
    with np.errstate(invalid="ignore", over="ignore"):
        want = round_bf16(ew.rms_norm(x, w, 1e-5))
    out = np.empty(x.shape, BF16)
    assert ew.rms_norm(x, w, 1e-5, out=out) is out
    np.testing.assert_array_equal(out.astype(np.float32).view(np.uint32), want.view(np.uint32))


def test_silu_mul_bfloat16_out_is_the_float32_result_rounded(variant):
    """As rms_norm's: a bfloat16 `out` holds round_bf16 of the float32 result (gate/up as column slices)."""
    from qkiln.kernels.bf16 import BF16, round_bf16

    rng = np.random.default_rng(5)
    gu = (rng.standard_normal((40, 2 * 96)) * 4).astype(np.float32)  # (t, 2 inter)
    gu[0, :3] = [1e-39, 3e38, -100.0]
    gate, up = gu[:, :96], gu[:, 96:]
    with np.errstate(over="ignore"):
        want = round_bf16(ew.silu_mul(gate, up))
    out = np.empty((40, 96), BF16)
    assert ew.silu_mul(gate, up, out=out) is out
    np.testing.assert_array_equal(out.astype(np.float32).view(np.uint32), want.view(np.uint32))


def _check_silu(gate, up):
    got = ew.silu_mul(gate, up)
    with np.errstate(invalid="ignore"):  # -inf / inf, inf * 0
        ref = np_silu_mul(gate, up)
    assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
    _same_nonfinite(got, ref)
    fin = np.isfinite(ref)
    err = np.abs(got[fin].astype(np.float64) - ref[fin])
    bound = ew.SILU_RTOL * np.abs(ref[fin]) + ew.SILU_ATOL
    assert (err <= bound).all(), float(err.max())
    return got


@pytest.mark.parametrize("t", [1, 3, 4096])
@pytest.mark.parametrize("inter", [1, 7, 1000, 1536])
def test_silu_mul_on_gate_up_slices(variant, t, inter):
    rng = np.random.default_rng(t + inter)
    gu = (rng.standard_normal((t, 2 * inter)) * 4).astype(np.float32)  # (t, 2 inter), as the gate_up linear
    _check_silu(gu[:, :inter], gu[:, inter:])  # what runtime/llama.py and quantize/sequential.py pass


def test_silu_mul_saturating_and_special(variant):
    g = np.array([-100, -89, -88.7, -88, -50, -20, -1e-30, -0.0, 0.0, 1e-30, 1e-3, 20, 50, 88, 88.7, 89, 100,
                  np.inf, -np.inf, np.nan, 3.0, 3.0, 3.0, -3.0, 1e38, -1e38], np.float32)
    u = np.array([1.5] * 20 + [np.nan, np.inf, 0.0, -np.inf, 2.0, 2.0], np.float32)
    got = _check_silu(g.reshape(2, -1), u.reshape(2, -1))
    assert got.ravel()[0] == 0.0  # exp(100) overflows: -100 / inf = -0
    assert got.ravel()[16] == np.float32(100 * 1.5)  # exp(-100) -> 0
    # random gates over the whole range where e^-g neither overflows nor vanishes into 1 + e
    rng = np.random.default_rng(2)
    gate = rng.uniform(-100, 30, (512, 1000)).astype(np.float32)  # products rounded into subnormals too
    _check_silu(gate, rng.standard_normal((512, 1000)).astype(np.float32))
    _check_silu(np.zeros((3, 17), np.float32), np.ones((3, 17), np.float32))


def test_silu_mul_one_dimensional(variant):
    rng = np.random.default_rng(3)
    g, u = rng.standard_normal(37).astype(np.float32), rng.standard_normal(37).astype(np.float32)
    assert _check_silu(g, u).shape == (37,)


def test_exp_polynomial_error():
    """e^x within 2 ulp of the float64 value wherever the result is a normal float (SiLU's e^-g)."""
    x = np.concatenate([np.linspace(-87.3, 88.7, 200_001, dtype=np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30], np.float32)])
    ref = np.exp(x.astype(np.float64))
    for v in VARIANTS:
        y = ew.exp_approx(x, v)
        ulp = np.spacing(ref.astype(np.float32)).astype(np.float64)
        assert (np.abs(y - ref) <= 2 * ulp).all(), float((np.abs(y - ref) / ulp).max())
    edges = np.array([-np.inf, -200, -104, 89, 100, np.inf], np.float32)
    np.testing.assert_array_equal(ew.exp_approx(edges), [0, 0, 0, np.inf, np.inf, np.inf])


ROPE_CASES = {  # (b, s, heads, kv_heads, d)
    "demo": (2, 33, 9, 3, 64),
    "one-token": (1, 1, 9, 3, 64),
    "decode-batch": (3, 1, 4, 2, 64),
    "odd-half-20": (2, 7, 3, 1, 40),
    "d2": (1, 5, 2, 1, 2),
    "d128": (1, 9, 4, 2, 128),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_apply_rope_bitwise_on_qkv_slices(variant, case):
    from qkiln.model.config import LlamaConfig

    b, s, heads, kvh, d = ROPE_CASES[case]
    q_out, kv_out = heads * d, kvh * d
    rng = np.random.default_rng(sum(ROPE_CASES[case]))
    qkv = (rng.standard_normal((b * s, q_out + 2 * kv_out)) * 3).astype(np.float32)  # the fused product
    cfg = LlamaConfig(hidden_size=heads * d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kvh, vocab_size=8, head_dim=d)
    cos, sin = RopeTable(cfg, initial=64).get(5, s)  # (s, d/2) row views of the table
    for x in (qkv[:, :q_out].reshape(b, s, heads, d), qkv[:, q_out:q_out + kv_out].reshape(b, s, kvh, d)):
        got, ref = ew.apply_rope(x, cos, sin), np_apply_rope(x, cos, sin)
        assert got.dtype == np.float32 and got.shape == ref.shape and got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref)


def test_apply_rope_strided_tables_and_nan(variant):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 3, 64)).astype(np.float32)
    x[1, 2, 0, 3] = np.nan
    x[0, 1, 2, 40] = np.inf
    table = rng.standard_normal((6, 100)).astype(np.float32)
    cos, sin = table[:, :32], table[:, 50:82]  # (6, 32) with row stride 100
    got, ref = ew.apply_rope(x, cos, sin), np_apply_rope(x, cos, sin)
    assert np.isnan(got[1, 2, 0]).sum() == 2  # the NaN reaches both halves of its pair
    np.testing.assert_array_equal(got, ref)


def test_variants_give_the_same_bits(monkeypatch):
    """rms_norm and apply_rope: the same operations in the same order (silu_mul's AVX-512 e^x uses FMAs)."""
    if len(VARIANTS) < 2:
        pytest.skip("only the portable variant runs on this CPU")
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((37, 1003)) * 7).astype(np.float32)
    w = rng.standard_normal(1003).astype(np.float32)
    r = rng.standard_normal((3, 11, 5, 40)).astype(np.float32)
    cs = rng.standard_normal((11, 20)).astype(np.float32)
    outs = []
    for v in VARIANTS:
        monkeypatch.setenv("QKILN_KERNEL", ENV_OF[v])
        outs.append((ew.rms_norm(x, w, 1e-6), ew.rms_norm(x[:, :45], w[:45], 1e-6), ew.apply_rope(r, cs, -cs)))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_give_the_same_bits():
    """Rows split over threads (big enough inputs: at most one thread per 32768 floats) change nothing."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((301, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    gu = rng.standard_normal((301, 2000)).astype(np.float32)
    r = rng.standard_normal((3, 101, 9, 64)).astype(np.float32)
    cs = rng.standard_normal((101, 32)).astype(np.float32)
    for th in (0, 2, 3, 1000):
        np.testing.assert_array_equal(ew.rms_norm(x, w, 1e-5, threads=th), ew.rms_norm(x, w, 1e-5))
        np.testing.assert_array_equal(ew.silu_mul(gu[:, :1000], gu[:, 1000:], threads=th),
                                      ew.silu_mul(gu[:, :1000], gu[:, 1000:]))
        np.testing.assert_array_equal(ew.apply_rope(r, cs, cs, threads=th), ew.apply_rope(r, cs, cs))


def test_empty_inputs(variant):
    w = np.ones(576, np.float32)
    assert ew.rms_norm(np.zeros((0, 576), np.float32), w, 1e-5).shape == (0, 576)
    assert ew.silu_mul(np.zeros((0, 5), np.float32), np.zeros((0, 5), np.float32)).shape == (0, 5)
    cs = np.zeros((0, 32), np.float32)
    assert ew.apply_rope(np.zeros((2, 0, 3, 64), np.float32), cs, cs).shape == (2, 0, 3, 64)


def _no_library(monkeypatch):
    def fail():
        raise AssertionError("the C library was asked for on the NumPy path")

    monkeypatch.setattr(ew, "_load", fail)


def _numpy_cases():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 576)).astype(np.float32)
    w = rng.standard_normal(576).astype(np.float32)
    gu = rng.standard_normal((5, 64)).astype(np.float32)
    r = rng.standard_normal((1, 5, 3, 64)).astype(np.float32)
    cs = rng.standard_normal((5, 32)).astype(np.float32)
    return x, w, gu, r, cs


def _assert_numpy_answers(x, w, gu, r, cs):
    np.testing.assert_array_equal(ew.rms_norm(x, w, 1e-5), np_rms_norm(x, w, 1e-5))
    np.testing.assert_array_equal(ew.silu_mul(gu[:, :32], gu[:, 32:]), np_silu_mul(gu[:, :32], gu[:, 32:]))
    np.testing.assert_array_equal(ew.apply_rope(r, cs, cs), np_apply_rope(r, cs, cs))


def test_numpy_when_asked(monkeypatch):
    monkeypatch.setenv("QKILN_KERNEL", "numpy")
    _no_library(monkeypatch)
    _assert_numpy_answers(*_numpy_cases())


def test_numpy_without_library(monkeypatch):
    monkeypatch.delenv("QKILN_KERNEL", raising=False)
    monkeypatch.setattr(ew, "_load", lambda: None)
    _assert_numpy_answers(*_numpy_cases())


def test_numpy_for_inputs_the_c_functions_do_not_take(monkeypatch):
    monkeypatch.delenv("QKILN_KERNEL", raising=False)
    x, w, gu, r, cs = _numpy_cases()
    x64 = x.astype(np.float64)  # float64 in: NumPy's float64 answer
    out = ew.rms_norm(x64, w, 1e-5)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, np_rms_norm(x64, w, 1e-5))
    xt = np.asfortranarray(x)[:, ::-1]  # negative last-axis stride
    np.testing.assert_array_equal(ew.rms_norm(xt, w, 1e-5), np_rms_norm(xt, w, 1e-5))
    np.testing.assert_array_equal(ew.silu_mul(gu, gu[:1]), np_silu_mul(gu, gu[:1]))  # broadcasting
    rt = np.repeat(r, 2, axis=-1)[..., ::2]  # (1, 5, 3, 64), last axis not contiguous
    np.testing.assert_array_equal(ew.apply_rope(rt, cs, cs), np_apply_rope(rt, cs, cs))


def test_unknown_kernel_path_is_an_error(monkeypatch):
    monkeypatch.setenv("QKILN_KERNEL", "bogus")
    with pytest.raises(KernelError, match="QKILN_KERNEL"):
        ew.rms_norm(np.ones((1, 4), np.float32), np.ones(4, np.float32), 1e-5)


@pytest.mark.parametrize("where", ["c", "numpy"])
def test_results_written_into_out(monkeypatch, where):
    """With out=, the result lands in the caller's array (a slice of a bigger one, as calibration passes),
    is the same as without it, and the array itself is returned; an `out` the C function cannot take
    directly (wrong dtype) is still filled, through a copy."""
    if where == "numpy":
        monkeypatch.setenv("QKILN_KERNEL", "numpy")
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 40)).astype(np.float32)
    w = rng.standard_normal(40).astype(np.float32)
    gu = rng.standard_normal((6, 80)).astype(np.float32)
    big = np.full((10, 40), np.nan, np.float32)
    got = ew.rms_norm(x, w, 1e-5, out=big[2:8])
    assert np.shares_memory(got, big)
    np.testing.assert_array_equal(big[2:8], ew.rms_norm(x, w, 1e-5))
    assert np.isnan(big[:2]).all() and np.isnan(big[8:]).all()
    act = np.empty((6, 40), np.float32)
    assert ew.silu_mul(gu[:, :40], gu[:, 40:], out=act) is act
    np.testing.assert_array_equal(act, ew.silu_mul(gu[:, :40], gu[:, 40:]))
    f64 = np.empty((6, 40), np.float64)
    assert ew.rms_norm(x, w, 1e-5, out=f64) is f64
    np.testing.assert_array_equal(f64, ew.rms_norm(x, w, 1e-5).astype(np.float64))
