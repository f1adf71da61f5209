"""bf16 products for calibration: the rounding rule is exact (NumPy == ml_dtypes on normals == the C
conversion), and every path (AMX tiles, AVX512_BF16, NumPy) gives the float64 product of the rounded inputs
within the stated bound."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from qkiln.kernels import bf16, elementwise
from qkiln.kernels.api import KernelError

U = 2.0**-24  # float32 unit roundoff


def _skip_unless(path: str) -> str:
    why = bf16.unavailable_reason(path)
    if why is not None:
        pytest.skip(f"the {path} path cannot run here ({why}); the others are tested")
    return path


@pytest.fixture(params=["amx", "avx512bf16", "numpy"])
def path(request):
    return _skip_unless(request.param)


@pytest.fixture(params=["amx", "avx512bf16"])
def c_path(request):
    """The C paths, whose bytes must not depend on blocking, threads or concurrent callers."""
    return _skip_unless(request.param)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


def _normals(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 values with random bits across every normal exponent, plus exact ties (low half 0x8000)."""
    bits = rng.integers(0x00800000, 0x7F7FFFFF, size, dtype=np.uint32, endpoint=True)
    ties = (bits[: size // 4] & np.uint32(0xFFFF0000)) | np.uint32(0x8000)  # both even and odd upper halves
    bits = np.concatenate([bits, ties, np.array([0x00800000, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000],
                                                np.uint32)])
    sign = rng.integers(0, 2, bits.size, dtype=np.uint32) << np.uint32(31)
    return (bits | sign).view(np.float32)


def _rule_on_bits(x: np.ndarray) -> np.ndarray:
    """The rounding rule written out on the integer bits, independently of the module's implementation."""
    u = _bits(x).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    r = np.where((u & 0x7F800000) == 0, u & 0x80000000, r)
    r = np.where((u & 0x7FFFFFFF) > 0x7F800000, ((u >> 16) | 0x40) << 16, r)
    return r.astype(np.uint32)


@pytest.fixture(params=["c", "numpy"])
def conversion(request, monkeypatch):
    """The bf16 conversions' C pass (kernels.elementwise) and NumPy's (kernels.reference, QKILN_KERNEL=numpy)."""
    if request.param == "c" and elementwise.variant_name() == "numpy":
        pytest.skip("the C kernel library cannot be built here")
    if request.param == "numpy":
        monkeypatch.setenv("QKILN_KERNEL", "numpy")
    return request.param


def test_round_bf16_is_the_rule_on_every_kind_of_bit_pattern(conversion):
    every = np.random.default_rng(2).integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x00000001, 0x007FFFFF, 0x807FFFFF, 0x00800000, 0x7F7F8000, 0x7F800000, 0x7F800001,
                      0xFFC00000, 0x7FFFFFFF, 0x80000000, 0], np.uint32)
    x = np.concatenate([every, edges]).view(np.float32)
    np.testing.assert_array_equal(_bits(bf16.round_bf16(x)), _rule_on_bits(x))
    np.testing.assert_array_equal(bf16.round_bf16(x[:10**6].reshape(1000, 1000)).ravel(), bf16.round_bf16(x[:10**6]))


def test_round_bf16_is_ml_dtypes_rne_on_normals():
    x = _normals(np.random.default_rng(0), 400_000)
    want = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_bits(bf16.round_bf16(x)), _bits(want))
    # ties go to even: 1 + 2^-8 (halfway between 1 and 1 + 2^-7) -> 1; 1 + 3*2^-8 -> 1 + 2^-6
    assert bf16.round_bf16(np.float32([1 + 2**-8, 1 + 3 * 2**-8])).tolist() == [1.0, 1 + 2**-6]


def test_store_rounded_writes_the_rule_s_bits(conversion):
    """A bfloat16 array written from float32 holds the rule's upper halves, NaN payloads included, in any layout."""
    every = np.random.default_rng(3).integers(0, 2**32, 300_007, dtype=np.uint64).astype(np.uint32).view(np.float32)
    out = np.empty(every.shape, ml_dtypes.bfloat16)
    assert elementwise.store_rounded(every, out) is out
    np.testing.assert_array_equal(out.view(np.uint16), (_rule_on_bits(every) >> np.uint32(16)).astype(np.uint16))
    strided = np.empty((100, 20), ml_dtypes.bfloat16)[:, ::2]  # (100, 10) view
    elementwise.store_rounded(every[:1000].reshape(100, 10), strided)
    np.testing.assert_array_equal(strided.view(np.uint16), out[:1000].view(np.uint16).reshape(100, 10))


def test_widen_is_the_exact_float32_of_every_bfloat16(conversion):
    """All 65536 bf16 bit patterns (NaNs, infinities, subnormals, -0 included) widen to the float32 whose upper
    half they are, in the array's shape; other dtypes pass through."""
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16).reshape(256, 256)
    got = bf16.widen(every)
    assert got.dtype == np.float32 and got.shape == (256, 256)
    np.testing.assert_array_equal(_bits(got), np.arange(2**16, dtype=np.uint32).reshape(256, 256) << 16)
    np.testing.assert_array_equal(_bits(got[::3, 1:]), _bits(bf16.widen(every[::3, 1:])))  # strided input
    x = np.float32([1.5, -2.0])
    assert bf16.widen(x) is x


def test_round_bf16_special_values(conversion):
    x = np.float32([np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 1.2e-38, 3.4e38, -3.4e38, 3.3895314e38])
    r = bf16.round_bf16(x)
    assert r[:2].tolist() == [np.inf, -np.inf]
    assert _bits(r[2:6]).tolist() == [0, 0x80000000, 0, 0x80000000]  # denormals flush, sign kept
    assert r[6] == np.float32(1.2e-38).astype(ml_dtypes.bfloat16).astype(np.float32)  # smallest normals kept
    assert r[7:9].tolist() == [np.inf, -np.inf]  # past the largest bf16
    assert r[9] == np.float32(3.3895314e38)  # the largest bf16 itself
    nans = np.array([0x7FC00000, 0xFF800001, 0x7F80FFFF, 0x7FBFFFFF], np.uint32).view(np.float32)
    rn = bf16.round_bf16(nans)
    assert np.isnan(rn).all()
    assert (_bits(rn) & np.uint32(0x80000000)).tolist() == [0, 0x80000000, 0, 0]


def test_c_conversion_is_round_bf16_bit_for_bit():
    if not bf16.c_paths():
        pytest.skip(f"no C bf16 path can run here ({bf16.unavailable_reason('avx512bf16')})")
    rng = np.random.default_rng(1)
    every = rng.integers(0, 2**32, 1_000_003, dtype=np.uint64).astype(np.uint32).view(np.float32)  # denormals, NaNs
    for x in (every, _normals(rng, 100_001), every[:5]):
        np.testing.assert_array_equal(_bits(bf16.round_bf16_c(x)), _bits(bf16.round_bf16(x)))


def _check(got: np.ndarray, xr: np.ndarray, wr: np.ndarray, kterms: int) -> None:
    """got vs the float64 product of the rounded inputs: within K·2⁻²⁴·Σ|xw| (rigorous), ~1e-7 typically."""
    x64, w64 = xr.astype(np.float64), wr.astype(np.float64)
    exact = x64 @ w64.T
    s = np.abs(x64) @ np.abs(w64).T
    err = np.abs(got.astype(np.float64) - exact)
    assert got.dtype == np.float32 and got.shape == exact.shape
    assert np.all(err <= kterms * U * s + kterms * 2.0**-126), np.max(err - kterms * U * s)
    nz = s > 0
    if nz.any():  # the worst case above is loose for large K; the observed error is far smaller
        assert np.max(err[nz] / s[nz]) <= 2e-6, np.max(err[nz] / s[nz])
    assert np.all(err[~nz] == 0)


M_SIZES = (1, 15, 16, 33, 1000)
KN_SIZES = ((1, 1), (95, 17), (17, 95), (576, 1536), (1536, 576))


@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize(("k", "n"), KN_SIZES)
def test_linear_is_the_product_of_rounded_inputs(path, m, k, n):
    rng = np.random.default_rng(m * 7919 + k * 31 + n)
    x = rng.standard_normal((m, k), dtype=np.float32) * np.float32(3)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
    pw = bf16.pack_weight(w, path=path)
    assert pw.path == path and pw.shape == (n, k)
    _check(bf16.linear(x, pw), bf16.round_bf16(x), bf16.round_bf16(w), k)


@pytest.mark.parametrize("m", (1, 33, 1000))
@pytest.mark.parametrize(("k", "n"), ((95, 17), (576, 1536), (1536, 576)))
def test_linear_add_accumulates_into_y(path, m, k, n):
    rng = np.random.default_rng(m + k + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)
    y0 = rng.standard_normal((m, n), dtype=np.float32) * np.float32(10)  # a residual stream
    pw = bf16.pack_weight(w, path=path)
    y = y0.copy()
    assert bf16.linear_add(x, pw, y) is y
    xr, wr = bf16.round_bf16(x).astype(np.float64), bf16.round_bf16(w).astype(np.float64)
    exact = y0 + xr @ wr.T
    bound = (k + 1) * U * (np.abs(y0) + np.abs(xr) @ np.abs(wr).T)  # float32 sums started from y0
    assert np.all(np.abs(y - exact) <= bound)
    for t in (1, 3):  # the thread split does not change any sum's order
        again = y0.copy()
        np.testing.assert_array_equal(bf16.linear_add(x, pw, again, nthreads=t), y)
    with pytest.raises(ValueError, match="out must be"):
        bf16.linear_add(x, pw, y0[:, :-1])


@pytest.mark.parametrize(("m", "k", "inter"), ((1, 64, 16), (33, 95, 48), (1000, 576, 1536)))
def test_linear_glu_is_silu_mul_of_the_two_products(path, m, k, inter, monkeypatch):
    from qkiln.kernels.elementwise import silu_mul

    if path != "numpy":  # the C paths' SiLU is the element-wise kernel's AVX-512 variant (both imply AVX-512)
        monkeypatch.setenv("QKILN_KERNEL", "avx512")
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    gate, up = (rng.standard_normal((inter, k), dtype=np.float32) * np.float32(0.1) for _ in range(2))
    w = bf16.pack_glu(gate, up, path=path)
    want = silu_mul(bf16.linear(x, bf16.pack_weight(gate, path=path)), bf16.linear(x, bf16.pack_weight(up, path=path)))
    np.testing.assert_array_equal(bf16.linear_glu(x, w), want)  # same sums, same silu arithmetic
    out = bf16.aligned_empty((m, inter))
    assert bf16.linear_glu(x, w, out=out, nthreads=3) is out
    np.testing.assert_array_equal(out, want)
    with pytest.raises(ValueError, match="multiple of 16"):
        bf16.pack_glu(gate[:8], up[:8], path=path)


def test_linear_zeros_large_magnitudes_and_thread_counts(path):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((70, 95), dtype=np.float32) * np.float32(1e17)  # products ~1e34, sums < float32 max
    x[3] = 0
    x[:, 10] = 0
    w = rng.standard_normal((33, 95), dtype=np.float32) * np.float32(1e17)
    w[5] = 0
    pw = bf16.pack_weight(w, path=path)
    y = bf16.linear(x, pw)
    _check(y, bf16.round_bf16(x), bf16.round_bf16(w), 95)
    assert np.all(y[3] == 0) and np.all(y[:, 5] == 0)
    for t in (1, 3):  # the split across threads does not change any sum's order
        np.testing.assert_array_equal(bf16.linear(x, pw, nthreads=t), y)
    assert np.all(bf16.linear(np.zeros((40, 95), np.float32), pw) == 0)
    out = np.full((70, 33), np.nan, np.float32)
    assert bf16.linear(x, pw, out=out) is out
    np.testing.assert_array_equal(out, y)
    with pytest.raises(ValueError, match="out must be"):
        bf16.linear(x, pw, out=np.empty((70, 32), np.float32))


@pytest.mark.parametrize("m", M_SIZES)
@pytest.mark.parametrize("k", (1, 17, 95, 576, 1536))
def test_gram_is_exactly_symmetric_and_the_rounded_product(path, m, k):
    rng = np.random.default_rng(m * 13 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    x[:, 0] *= np.float32(1e12)  # a large-magnitude feature next to ordinary ones
    g = bf16.gram(x, path=path)
    assert np.array_equal(g, g.T)
    xr = bf16.round_bf16(x)
    _check(g, xr.T, xr.T, m)


@pytest.mark.parametrize("k", (1, 17, 200, 576, 1536))
def test_gram_sum_is_the_rounded_product_of_all_chunks(path, k):
    rng = np.random.default_rng(k)
    chunks = [rng.standard_normal((m, k), dtype=np.float32) for m in (1000, 0, 33, 512)]
    chunks[2][:, 0] *= np.float32(1e6)
    s = bf16.GramSum(k, path=path)
    assert np.all(s.result() == 0)  # nothing added yet
    for x in chunks:
        s.add(x)
    g = s.result()
    assert s.tokens == 1545 and np.array_equal(g, g.T)
    xr = bf16.round_bf16(np.concatenate(chunks))
    _check(g, xr.T, xr.T, len(xr))
    if path != "numpy":  # the bytes depend on the chunks, not on the threads
        for t in (1, 3):
            again = bf16.GramSum(k, path=path, nthreads=t)
            for x in chunks:
                again.add(x)
            np.testing.assert_array_equal(again.result(out=bf16.aligned_empty((k, k))), g)
    with pytest.raises(ValueError, match="width"):
        s.add(np.ones((3, k + 1), np.float32))
    halves = [bf16.GramSum(k, path=path) for _ in range(3)]  # the third stays empty
    for i, x in enumerate(chunks):
        halves[i % 2].add(x)
    for other in halves[1:]:
        halves[0].merge(other)
    assert halves[0].tokens == 1545
    np.testing.assert_allclose(halves[0].result(), g, rtol=1e-5, atol=1e-5 * np.abs(g).max())
    with pytest.raises(ValueError, match="merge"):
        halves[0].merge(bf16.GramSum(k + 1, path=path))


def test_gram_zeros_threads_and_agreement_between_paths():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3000, 200), dtype=np.float32)
    x[:, 7] = 0
    x[100:900] = 0
    got = {p: bf16.gram(x, path=p) for p in ("numpy", *bf16.c_paths())}
    for g in got.values():
        assert np.all(g[7] == 0) and np.all(g[:, 7] == 0)
    xr = bf16.round_bf16(x).astype(np.float64)
    s = np.abs(xr).T @ np.abs(xr)
    for p in bf16.c_paths():
        assert np.all(np.abs(got[p] - got["numpy"]) <= 2 * 3000 * U * s)
        for t in (1, 3):
            np.testing.assert_array_equal(bf16.gram(x, path=p, nthreads=t), got[p])
    assert np.all(bf16.gram(np.zeros((5, 40), np.float32)) == 0)


def test_path_choice_and_errors(monkeypatch):
    monkeypatch.setenv("QKILN_KERNEL", "numpy")
    assert bf16.bf16_path() == "numpy"
    assert bf16.pack_weight(np.ones((2, 3), np.float32)).path == "numpy"
    monkeypatch.delenv("QKILN_KERNEL")
    fastest = next((p for p in ("amx", "avx512bf16") if bf16.available(p)), "numpy")
    assert bf16.bf16_path() == fastest
    for p in ("amx", "avx512bf16"):
        if not bf16.available(p):  # asked for by name where it cannot run: an error, never another path
            with pytest.raises(KernelError, match=f"the {p} bf16 path cannot run here"):
                bf16.pack_weight(np.ones((2, 3), np.float32), path=p)
    with pytest.raises(KernelError, match="unknown bf16 path"):
        bf16.gram(np.ones((2, 3), np.float32), path="avx9")
    with pytest.raises(ValueError, match="width"):
        bf16.linear(np.ones((2, 4), np.float32), bf16.pack_weight(np.ones((2, 3), np.float32)))
    with pytest.raises(ValueError, match="2-D"):
        bf16.gram(np.ones(3, np.float32))


def test_linear_bytes_do_not_depend_on_blocking_threads_or_the_other_tokens(c_path):
    """Each output is one float32 sum over k in k order: the strip blocks, the thread split and which
    other tokens share the call do not change a bit."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1000, 576), dtype=np.float32)
    pw = bf16.pack_weight(rng.standard_normal((1536, 576), dtype=np.float32) * np.float32(0.05), path=c_path)
    y = bf16.linear(x, pw, nthreads=1)
    for t in (2, 3, 5):
        np.testing.assert_array_equal(bf16.linear(x, pw, nthreads=t), y)
    np.testing.assert_array_equal(bf16.linear(x[517:518], pw), y[517:518])
    np.testing.assert_array_equal(bf16.linear(x[300:700], pw), y[300:700])


def test_gram_bytes_do_not_depend_on_the_macro_blocks(c_path):
    """1000 features are cut into several accumulator blocks (448 features make one): a feature range's
    sums are the same bits either way, and for any thread count."""
    x = np.random.default_rng(13).standard_normal((300, 1000), dtype=np.float32)
    g = bf16.gram(x, path=c_path, nthreads=1)
    np.testing.assert_array_equal(g[64:512, 64:512], bf16.gram(x[:, 64:512], path=c_path))
    for t in (2, 3):
        np.testing.assert_array_equal(bf16.gram(x, path=c_path, nthreads=t), g)


def test_gram_sums_groups_of_8192_tokens_in_order(c_path):
    """The summation rule: each group of 8192 tokens is summed alone, the groups added in order."""
    x = np.random.default_rng(14).standard_normal((20000, 40), dtype=np.float32)
    parts = [bf16.gram(x[a : a + 8192], path=c_path) for a in range(0, 20000, 8192)]
    want = (parts[0] + parts[1]) + parts[2]
    for t in (1, 2, 3):
        np.testing.assert_array_equal(bf16.gram(x, path=c_path, nthreads=t), want)


def test_concurrent_callers_get_the_same_bytes(c_path):
    """Calibration calls the products from several threads at once (cached scratch arenas for two of
    them, private allocations beyond): every caller gets what a lone call gives."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(15)
    xs = [rng.standard_normal((700, 96 * (i + 1)), dtype=np.float32) for i in range(4)]
    pws = [bf16.pack_weight(rng.standard_normal((200, x.shape[1]), dtype=np.float32), path=c_path) for x in xs]
    want = [(bf16.gram(x, path=c_path, nthreads=1), bf16.linear(x, pw, nthreads=1)) for x, pw in zip(xs, pws, strict=True)]

    def run(i: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(bf16.gram(xs[i], path=c_path, nthreads=1), bf16.linear(xs[i], pws[i], nthreads=1)) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        for i, got in enumerate(pool.map(run, range(4))):
            for g, y in got:
                np.testing.assert_array_equal(g, want[i][0])
                np.testing.assert_array_equal(y, want[i][1])


def test_gram_out_is_written_and_checked(path):
    x = np.random.default_rng(16).standard_normal((100, 48), dtype=np.float32)
    want = bf16.gram(x, path=path)
    for out in (np.full((48, 48), np.nan, np.float32), bf16.aligned_empty((48, 48))):
        assert bf16.gram(x, path=path, out=out) is out
        np.testing.assert_array_equal(out, want)
    assert bf16.aligned_empty((3, 16)).__array_interface__["data"][0] % 64 == 0
    with pytest.raises(ValueError, match="out must be"):
        bf16.gram(x, path=path, out=np.empty((48, 47), np.float32))


@pytest.mark.parametrize(("m", "k", "n"), ((33, 95, 64), (1000, 1536, 576)))
def test_bfloat16_inputs_and_outputs_are_the_float32_ones_rounded(path, m, k, n, monkeypatch):
    """An activation stored in bfloat16 gives the products exactly what they would have rounded it to."""
    if path != "numpy":
        monkeypatch.setenv("QKILN_KERNEL", "avx512")
    rng = np.random.default_rng(m + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    xb = bf16.round_bf16(x).astype(bf16.BF16)
    w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.1)
    pw = bf16.pack_weight(w, path=path)
    np.testing.assert_array_equal(bf16.linear(xb, pw), bf16.linear(x, pw))
    y0 = rng.standard_normal((m, n), dtype=np.float32)
    np.testing.assert_array_equal(bf16.linear_add(xb, pw, y0.copy()), bf16.linear_add(x, pw, y0.copy()))
    sums = [bf16.GramSum(k, path=path) for _ in range(2)]
    sums[0].add(x)
    sums[1].add(xb)
    np.testing.assert_array_equal(sums[1].result(), sums[0].result())
    glu = bf16.pack_glu(w[: n // 2], w[n // 2 :], path=path)
    want = bf16.round_bf16(bf16.linear_glu(x, glu))
    got = bf16.linear_glu(xb, glu, out=np.empty((m, n // 2), bf16.BF16))
    np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.mark.parametrize("k", (64, 65, 201))
def test_numpy_gram_in_blocks_of_features(monkeypatch, k):
    """The NumPy Gram makes the upper block triangle (syrk on the diagonal, sgemm right of it): with blocks of
    at most 64 features (201 -> 51, 51, 51, 48) every element of the triangle is summed once, in float32 within
    the bound, the result exactly symmetric, and nothing below the diagonal reaches the result."""
    monkeypatch.setattr(bf16, "GRAM_BLOCK", 64)
    rng = np.random.default_rng(k)
    x = rng.standard_normal((300, k), dtype=np.float32)
    x[:, -1] *= np.float32(1e6)  # a large feature in the last, shorter block
    s = bf16.GramSum(k, path="numpy")
    s._acc[np.tril_indices(k, -1)] = np.nan  # below the diagonal: never part of the result
    s.add(x[:170])
    s.add(x[170:])
    g = s.result()
    assert np.array_equal(g, g.T) and not np.isnan(g).any()
    xr = bf16.round_bf16(x)
    _check(g, xr.T, xr.T, len(xr))


def test_numpy_path_in_token_blocks_gives_the_same_bytes(monkeypatch):
    """The NumPy path bounds its temporaries by a block of tokens (an 8B model's gate/up product of one batch
    was 470 MB per worker): each block is its own BLAS product (float32 sums in another order) and the Gram
    sum's blocks add in another order, so both agree within float32 rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 64)).astype(np.float32)
    gate, up = (rng.standard_normal((2 * bf16.GLU_ROWS, 64)).astype(np.float32) for _ in range(2))
    w = bf16.pack_glu(gate, up, path="numpy")
    whole = bf16.linear_glu(x, w)
    g_whole = bf16.GramSum(64, path="numpy")
    g_whole.add(x)
    monkeypatch.setattr(bf16, "NUMPY_CHUNK_FLOATS", 5 * 64)  # 5 tokens a block: a partial last block
    np.testing.assert_allclose(bf16.linear_glu(x, w), whole, rtol=1e-5, atol=1e-5)
    g_blocks = bf16.GramSum(64, path="numpy")
    g_blocks.add(x)
    np.testing.assert_allclose(g_blocks.result(), g_whole.result(), rtol=1e-5, atol=1e-4)
