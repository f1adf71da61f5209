"""The fused C causal attention against kernels.reference's NumPy function, on the shapes the
runtime produces: MHA and GQA, a KV-cache offset (t > s), decode (s = 1; and qk_decode_attention, the C decode
step's), odd lengths around the 12/8-row
groups and 64-key blocks, head_dim 24/64/96/128, saturating softmax, strided views; and its exp polynomial.

Tolerance (kernels.attention.ATOL_REL): max|Δ| ≤ 1e-5 · max|v| · (1 + max|score| / 16). The 2^x is within
~1 ulp (measured below 1e-7 relative), the fp32 sums of ≤ 130 probabilities and PV terms differ from NumPy's
only in order and in one rescale rounding per 64-key block (measured ≤ 2e-7 · max|v| on random data), and
a score's fp32 dot product differs from BLAS's by a few ulp of Σ|q_i k_i|, which moves the output by up to
that much times max|v|: hence the term growing with the score magnitude (1e-5 leaves a 10x margin over
the worst measured case, the saturating one).
"""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.kernels import attention
from qkiln.kernels.reference import causal_attention as numpy_attention

if attention.variant_name() == "numpy":
    pytest.skip("the C kernel library cannot be built here", allow_module_level=True)

VARIANTS = [v for v in ("portable", "avx2", "avx512") if attention.available(v)]


def _inputs(b, s, t, heads, kv_heads, d, seed=0, q_scale=1.0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((b, s, heads, d)) * q_scale).astype(np.float32)  # (b, s, heads, d)
    k = rng.standard_normal((b, kv_heads, t, d)).astype(np.float32)  # (b, kvh, t, d)
    v = rng.standard_normal((b, kv_heads, t, d)).astype(np.float32)  # (b, kvh, t, d)
    return q, k, v


def _tolerance(q, k, v):
    """ATOL_REL · max|v| · (1 + max|score| / 16), the bound stated in kernels.attention."""
    b, s, heads, d = q.shape
    kvh = k.shape[1]
    qg = q.reshape(b, s, kvh, heads // kvh, d).astype(np.float64)
    smax = np.abs(np.einsum("bsgrd,bgtd->bgrst", qg, k.astype(np.float64))).max() / np.sqrt(d)
    return attention.ATOL_REL * float(np.abs(v).max()) * (1.0 + smax / 16.0)


CASES = {
    "mha": (1, 33, 33, 4, 4, 64),
    "gqa-nrep3": (2, 130, 130, 9, 3, 64),
    "cache-offset": (2, 7, 40, 6, 2, 64),
    "decode": (3, 1, 130, 9, 3, 64),
    "one-token": (1, 1, 1, 3, 1, 64),
    "odd-7": (1, 7, 7, 9, 3, 64),
    "odd-33-130": (2, 33, 130, 4, 2, 64),
    "head-dim-24": (1, 33, 70, 4, 2, 24),
    "head-dim-96": (2, 130, 130, 6, 3, 96),
    "head-dim-128": (1, 70, 70, 8, 2, 128),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_numpy(case, variant):
    q, k, v = _inputs(*CASES[case])
    want = numpy_attention(q, k, v)  # (b * s, heads * d)
    tol = _tolerance(q, k, v)
    for threads in (1, 2):
        got = attention.causal_attention_c(q, k, v, threads=threads, variant=variant)
        assert got.shape == want.shape and got.dtype == np.float32
        err = float(np.abs(got - want).max())
        assert err <= tol, (case, variant, threads, err, tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_thread_count_does_not_change_the_result(variant):
    """Units split the queries at multiples of the row groups and keys at the same 64-key blocks, so any
    thread count gives the same bits (0 = one per core; absurd counts are capped)."""
    q, k, v = _inputs(2, 130, 130, 9, 3, 64, seed=3)
    one = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    for threads in (0, 2, 3, 1000):
        np.testing.assert_array_equal(attention.causal_attention_c(q, k, v, threads=threads, variant=variant), one)


@pytest.mark.parametrize("variant", VARIANTS)
def test_saturating_softmax(variant):
    """Scores of magnitude ~100: exp of most scores underflows to 0, one key per row dominates."""
    q, k, v = _inputs(2, 70, 130, 6, 2, 64, seed=1, q_scale=12.0)
    want = numpy_attention(q, k, v)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    assert np.isfinite(got).all()
    assert float(np.abs(got - want).max()) <= _tolerance(q, k, v)


@pytest.mark.parametrize("variant", VARIANTS)
def test_strided_views_as_the_runtime_passes_them(variant):
    """q, k, v sliced out of one fused projection and transposed (runtime.llama's views): no copy needed,
    same answer as contiguous inputs; a non-contiguous head axis is copied."""
    b, s, heads, kvh, d = 2, 45, 9, 3, 64
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((b * s, (heads + 2 * kvh) * d)).astype(np.float32)  # (b*s, fused)
    q = qkv[:, : heads * d].reshape(b, s, heads, d)  # (b, s, heads, d) view
    k = qkv[:, heads * d : (heads + kvh) * d].reshape(b, s, kvh, d).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    v = qkv[:, (heads + kvh) * d :].reshape(b, s, kvh, d).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    want = attention.causal_attention_c(*map(np.ascontiguousarray, (q, k, v)), threads=1, variant=variant)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    np.testing.assert_array_equal(got, want)
    qf = np.asfortranarray(q)  # last axis not contiguous: copied
    np.testing.assert_array_equal(attention.causal_attention_c(qf, k, v, threads=1, variant=variant), want)
    assert float(np.abs(got - numpy_attention(q, k, v)).max()) <= _tolerance(q, k, v)


@pytest.mark.parametrize("variant", VARIANTS)
def test_decode_on_kv_cache_views(variant):
    """Decode and short chunks against the first t positions of a larger KV-cache buffer (runtime's
    KVCache.store views): rows of several heads share a row group, keys come from a strided view."""
    rng = np.random.default_rng(4)
    kb = rng.standard_normal((2, 3, 1024, 64)).astype(np.float32)  # (b, kvh, capacity, d)
    vb = rng.standard_normal((2, 3, 1024, 64)).astype(np.float32)
    for s, t in ((1, 1), (1, 700), (5, 700), (16, 1024)):
        q = rng.standard_normal((2, s, 9, 64)).astype(np.float32)  # (b, s, heads, d)
        k, v = kb[:, :, :t], vb[:, :, :t]  # (b, kvh, t, d) views
        got = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
        assert float(np.abs(got - numpy_attention(q, k, v)).max()) <= _tolerance(q, k, v), (s, t)


# qk_decode_attention, the decode step's attention: one query per batch row, a head per task reading the keys in
# place (AVX-512: d % 16 == 0 and d <= 256, else the portable head); (b, t, heads, kv_heads, d)
SINGLE_QUERY = {"t1": (1, 1, 3, 1, 64), "t17-gqa": (2, 17, 9, 3, 64), "t130-d128": (1, 130, 8, 2, 128),
                "t37-d96": (1, 37, 6, 3, 96), "t70-d24": (2, 70, 4, 2, 24), "t20-d272": (1, 20, 2, 1, 272),
                "t700": (1, 700, 9, 3, 64)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(SINGLE_QUERY))
def test_single_query_matches_numpy(case, variant):
    b, t, heads, kvh, d = SINGLE_QUERY[case]
    q, k, v = _inputs(b, 1, t, heads, kvh, d, seed=5)
    want = numpy_attention(q, k, v)
    for threads in (1, 2, 3):
        got = attention.causal_attention_c(q, k, v, threads=threads, variant=variant, single_query=True)
        err = float(np.abs(got - want).max())
        assert err <= _tolerance(q, k, v), (case, variant, threads, err)
        if threads == 1:
            one = got
        np.testing.assert_array_equal(got, one)  # a head is one task: the same bits on any thread count


@pytest.mark.parametrize("variant", VARIANTS)
def test_single_query_saturating_and_on_cache_views(variant):
    """Scores of magnitude ~100, and keys from the first t positions of a larger KV-cache buffer."""
    q, k, v = _inputs(2, 1, 130, 6, 2, 64, seed=1, q_scale=12.0)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant, single_query=True)
    assert np.isfinite(got).all() and float(np.abs(got - numpy_attention(q, k, v)).max()) <= _tolerance(q, k, v)
    rng = np.random.default_rng(6)
    kb, vb = (rng.standard_normal((2, 3, 1024, 64)).astype(np.float32) for _ in range(2))  # (b, kvh, cap, d)
    q = rng.standard_normal((2, 1, 9, 64)).astype(np.float32)
    k, v = kb[:, :, :333], vb[:, :, :333]  # (b, kvh, t, d) views
    got = attention.causal_attention_c(q, k, v, threads=2, variant=variant, single_query=True)
    assert float(np.abs(got - numpy_attention(q, k, v)).max()) <= _tolerance(q, k, v)


@pytest.mark.parametrize("variant", VARIANTS)
def test_exp2_relative_error(variant):
    """The softmax's 2^x (scores are in base 2) over [-150, 0], i.e. e^x over [-104, 0]: max relative error
    within 2 ulp of float32 where 2^x is a normal float (x >= -126); below, the result is subnormal and
    within one subnormal step (2^-149); 2^-inf = 0 and 2^0 = 1."""
    x = -np.linspace(0.0, 150.0, 3_000_001, dtype=np.float64).astype(np.float32)  # (n,)
    want = np.exp2(x.astype(np.float64))  # (n,)
    got = attention.exp2_approx(x, variant).astype(np.float64)
    normal = want >= np.finfo(np.float32).tiny
    rel = np.abs(got - want)[normal] / want[normal]
    assert rel.max() <= 2 * 2.0**-23, rel.max()
    assert np.abs(got - want)[~normal].max() <= 2.0**-149
    special = attention.exp2_approx(np.array([-np.inf, 0.0, -1000.0, -1e30], np.float32), variant)
    np.testing.assert_array_equal(special, np.array([0.0, 1.0, 0.0, 0.0], np.float32))


def test_environment_selects_numpy_or_portable(monkeypatch):
    q, k, v = _inputs(2, 33, 40, 9, 3, 64)
    monkeypatch.setenv("QKILN_KERNEL", "numpy")
    np.testing.assert_array_equal(attention.causal_attention(q, k, v), numpy_attention(q, k, v))
    monkeypatch.setenv("QKILN_KERNEL", "scalar")
    np.testing.assert_array_equal(attention.causal_attention(q, k, v, threads=1),
                                  attention.causal_attention_c(q, k, v, threads=1, variant="portable"))
    monkeypatch.delenv("QKILN_KERNEL")  # unset: AVX-512 where the CPU has it, else AVX2, else NumPy
    auto = attention.causal_attention(q, k, v, threads=1)
    fast = next((v for v in ("avx512", "avx2") if attention.available(v)), None)
    assert attention.variant_name() == (fast or "portable")
    if fast is not None:
        np.testing.assert_array_equal(auto, attention.causal_attention_c(q, k, v, threads=1, variant=fast))
    else:
        np.testing.assert_array_equal(auto, numpy_attention(q, k, v))


def test_falls_back_to_numpy_without_the_library(monkeypatch):
    q, k, v = _inputs(1, 7, 7, 4, 2, 64)
    monkeypatch.delenv("QKILN_KERNEL", raising=False)
    monkeypatch.setattr(attention, "_load", lambda: None)
    np.testing.assert_array_equal(attention.causal_attention(q, k, v), numpy_attention(q, k, v))


def test_rejects_shapes_that_do_not_fit():
    q, k, v = _inputs(1, 8, 8, 4, 2, 64)
    with pytest.raises(ValueError, match="do not fit"):
        attention.causal_attention_c(q, k[:, :, :4], v[:, :, :4])  # t < s
    with pytest.raises(ValueError, match="do not fit"):
        attention.causal_attention_c(q[..., :3, :], k, v)  # 3 heads over 2 kv heads


@pytest.mark.parametrize("env", ["numpy", "scalar", ""])
def test_result_written_into_out(monkeypatch, env):
    """out= (a slice of a bigger array, as calibration passes) receives exactly the result without it."""
    q, k, v = _inputs(2, 9, 9, 4, 2, 64)
    monkeypatch.setenv("QKILN_KERNEL", env)
    big = np.full((22, 4 * 64), np.nan, np.float32)
    got = attention.causal_attention(q, k, v, threads=1, out=big[2:20])
    assert np.shares_memory(got, big)
    np.testing.assert_array_equal(big[2:20], attention.causal_attention(q, k, v, threads=1))
    assert np.isnan(big[:2]).all() and np.isnan(big[20:]).all()
    odd = np.empty((18, 4 * 64), np.float64)  # not a float32 array: filled through a copy
    assert attention.causal_attention(q, k, v, threads=1, out=odd) is odd


# ---- the bf16 variants (precision="bfloat16"): amx_bf16 on AMX tiles, avx512_bf16 on AVX512_BF16 ----

BF16_VARIANTS = [pytest.param(v, marks=pytest.mark.skipif(not attention.bf16_available(v), reason=f"{v} cannot run here"))
                 for v in attention.BF16_VARIANTS]

BF16_CASES = {
    "calib-nrep3": (2, 130, 130, 9, 3, 64),
    "mha-nrep1": (1, 33, 33, 4, 4, 64),
    "nrep4-cache-offset": (2, 21, 90, 8, 2, 64),
    "d40-not-32": (1, 45, 70, 6, 2, 40),
    "d8": (1, 17, 17, 3, 1, 8),
    "d200": (1, 40, 70, 4, 4, 200),
    "decode": (3, 1, 130, 9, 3, 64),
    "one-token": (1, 1, 1, 3, 1, 64),
}


def _bf16_tolerance(v):
    return attention.BF16_ATOL_REL * float(np.abs(v).max())


@pytest.mark.parametrize("variant", BF16_VARIANTS)
@pytest.mark.parametrize("case", list(BF16_CASES))
def test_bf16_matches_float32(case, variant):
    """Within BF16_ATOL_REL · max|v| of the float32 kernel, and actually rounded (not the float32 bits)."""
    q, k, v = _inputs(*BF16_CASES[case], seed=5)
    want = attention.causal_attention_c(q, k, v, threads=1, variant="avx512")  # (b * s, heads * d)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    assert got.shape == want.shape and got.dtype == np.float32 and np.isfinite(got).all()
    err = float(np.abs(got - want).max())
    assert err <= _bf16_tolerance(v), (case, err / float(np.abs(v).max()))
    if q.shape[1] > 1:
        assert err > 0.0  # bf16 inputs cannot reproduce float32 to the bit
    if variant == attention.bf16_variant():  # what calibration's precision="bfloat16" runs here
        np.testing.assert_array_equal(attention.causal_attention(q, k, v, threads=1, precision="bfloat16"), got)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_bf16_rows_with_a_single_visible_key(variant):
    """s = t: the first query sees only key 0, so its output is bf16(v[0]) exactly (p = 1, sum = 1); a
    saturating softmax keeps every row finite."""
    q, k, v = _inputs(2, 70, 70, 6, 2, 64, seed=6)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant).reshape(2, 70, 6, 64)
    v0 = v[:, :, 0].astype(np.float64)  # (b, kvh, d)
    want0 = np.repeat(v0, 3, axis=1)  # (b, heads, d): head h reads kv head h // 3
    bf16_v0 = np.repeat((v[:, :, 0].view(np.uint32) + 0x7FFF + ((v[:, :, 0].view(np.uint32) >> 16) & 1))
                        .astype(np.uint32) & 0xFFFF0000, 3, axis=1).view(np.float32)
    np.testing.assert_array_equal(got[:, 0], bf16_v0)
    assert float(np.abs(got[:, 0] - want0).max()) <= 2.0**-8 * float(np.abs(v0).max())
    qs, ks, vs = _inputs(2, 70, 130, 6, 2, 64, seed=1, q_scale=12.0)
    sat = attention.causal_attention_c(qs, ks, vs, threads=1, variant=variant)
    # scores ~100: a bf16 score error of ~0.4 may swap which key dominates a near-tie, so only finiteness
    # and the convex-combination bound (outputs are weighted means of bf16 values) are asserted
    assert np.isfinite(sat).all()
    assert float(np.abs(sat).max()) <= float(np.abs(vs).max()) * (1 + 2.0**-7)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_bf16_thread_count_does_not_change_the_bits(variant):
    """Tile rows are independent and key blocks start at multiples of 64: any grouping or thread count
    gives the same bits."""
    q, k, v = _inputs(2, 130, 150, 9, 3, 64, seed=3)
    one = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    for threads in (0, 2, 3, 1000):
        np.testing.assert_array_equal(attention.causal_attention_c(q, k, v, threads=threads, variant=variant), one)
    # one batch element alone (other unit split and row groups) gives the same rows
    alone = attention.causal_attention_c(q[1:], k[1:], v[1:], threads=1, variant=variant)
    np.testing.assert_array_equal(alone, one[130:])


@pytest.mark.parametrize("variant", BF16_VARIANTS)
def test_bf16_strided_views_as_the_runtime_passes_them(variant):
    b, s, heads, kvh, d = 2, 45, 9, 3, 64
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((b * s, (heads + 2 * kvh) * d)).astype(np.float32)  # (b*s, fused)
    q = qkv[:, : heads * d].reshape(b, s, heads, d)  # (b, s, heads, d) view
    k = qkv[:, heads * d : (heads + kvh) * d].reshape(b, s, kvh, d).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    v = qkv[:, (heads + kvh) * d :].reshape(b, s, kvh, d).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    want = attention.causal_attention_c(*map(np.ascontiguousarray, (q, k, v)), threads=1, variant=variant)
    got = attention.causal_attention_c(q, k, v, threads=1, variant=variant)
    np.testing.assert_array_equal(got, want)
    big = np.full((b * s + 3, heads * d), np.nan, np.float32)
    attention.causal_attention_c(q, k, v, threads=1, out=big[1:-2], variant=variant)
    np.testing.assert_array_equal(big[1:-2], want)
    assert np.isnan(big[0]).all() and np.isnan(big[-2:]).all()


def test_bfloat16_falls_back_to_float32_without_a_bf16_variant(monkeypatch):
    """Without a bf16 variant (or with QKILN_KERNEL naming another path) precision="bfloat16" is the float32
    result."""
    q, k, v = _inputs(2, 33, 40, 9, 3, 64)
    monkeypatch.delenv("QKILN_KERNEL", raising=False)
    monkeypatch.setattr(attention, "bf16_variant", lambda: None)
    np.testing.assert_array_equal(attention.causal_attention(q, k, v, threads=1, precision="bfloat16"),
                                  attention.causal_attention(q, k, v, threads=1))
    monkeypatch.undo()
    monkeypatch.setenv("QKILN_KERNEL", "numpy")
    np.testing.assert_array_equal(attention.causal_attention(q, k, v, precision="bfloat16"),
                                  numpy_attention(q, k, v))


def test_rejects_an_unknown_precision():
    q, k, v = _inputs(1, 8, 8, 4, 2, 64)
    with pytest.raises(ValueError, match="precision 'float16'"):
        attention.causal_attention(q, k, v, precision="float16")
