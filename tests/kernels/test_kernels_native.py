"""Every C path this machine can run equals the scalar reference and the NumPy path: exactly where the
arithmetic is exact (unit scales), within numpy_ref.TOLERANCE of the absolute term sum otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qkiln.kernels import api, numpy_ref
from qkiln.kernels.types import BLOCK, WType

sys.path.insert(0, str(Path(__file__).parent))
from conftest_helpers import random_int4g, random_weights, unit_activations

C_PATHS: list[str] = []  # filled by _c_library_regardless_of_env: every C path this machine runs
LEGACY_TYPES = [WType.Q5_0, WType.Q4_1, WType.Q5_1]  # llama.cpp's other 32-element blocks
K_TYPES = [WType.Q2_K, WType.Q3_K, WType.Q4_K, WType.Q5_K, WType.Q6_K]  # 256-element super-blocks
X8_TYPES = [WType.Q4_0X8, WType.Q8_0X8, WType.Q5_0X8]  # the AVX-512 repacks (every path runs them)
GGML_TYPES = [WType.Q4_0, WType.Q8_0, *LEGACY_TYPES, *K_TYPES, WType.Q4_0X2, *X8_TYPES]
SHAPES = [(1, 256, 1), (7, 512, 3), (33, 256, 2), (64, 768, 1), (5, 1024, 5)]  # (N, K, M): odd N, K % 256 == 0


@pytest.fixture(autouse=True, scope="module")
def _c_library_regardless_of_env():
    """These tests compare the C paths, so they load the library even when QKILN_KERNEL=numpy is exported;
    the variable is back (and re-read) for the modules that run after."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(api.ENV, raising=False)
        api.reset()
        C_PATHS[:] = [p for p in api.available_paths() if p != "numpy"]
        yield
    api.reset()


@pytest.fixture(autouse=True)
def _restore_path():
    before = api.kernel_path()
    yield
    api.set_kernel_path(before)


def test_a_compiled_path_exists():
    assert C_PATHS, "the C kernels did not build on this machine"
    assert "scalar" in C_PATHS


def test_activation_quantization_is_bit_identical():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 512)).astype(np.float32) * rng.uniform(0.01, 100, (4, 1)).astype(np.float32)
    x[0, :32] = 0.0  # zero block -> d = 0, codes 0
    x[1, 32:64] = -3.0  # amax from a negative value -> code -127 exactly, never -128
    x[2, 64:96] = np.arange(32) - 15.5  # many exact .5 ties after scaling
    ref = numpy_ref.quantize_q8(x)
    for p in C_PATHS:
        api.set_kernel_path(p)
        got = api.quantize_activations_q8(x)
        np.testing.assert_array_equal(got.qs, ref.qs)
        np.testing.assert_array_equal(got.d, ref.d)
        np.testing.assert_array_equal(got.sums, ref.sums)
    assert ref.qs.min() >= -127 and (ref.qs[1, 32:64] == -127).all() and (ref.qs[0, :32] == 0).all()
    assert ref.d[0, 0] == 0.0


@pytest.mark.parametrize("wtype", [t for t in GGML_TYPES if t not in (WType.Q4_0X2, *X8_TYPES)], ids=lambda t: t.name)
def test_numpy_decode_matches_gguf_dequantize(wtype):
    gguf = pytest.importorskip("gguf", reason="gguf-py is the golden block decoder")
    rng = np.random.default_rng(2)
    n, k = 6, 512
    w = random_weights(wtype, n, k, rng)
    codes, scale, mins = numpy_ref.decode(wtype, w, n, k)
    nb = k // 32
    ours = (codes.reshape(n, nb, 32) * scale[..., None]).reshape(n, k) - np.repeat(mins, k // mins.shape[1], axis=1)
    theirs = gguf.quants.dequantize(w.reshape(n, -1), gguf.GGMLQuantizationType(int(wtype)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wtype", GGML_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_paths_equal_numpy_within_tolerance(wtype, shape):
    n, k, m = shape
    rng = np.random.default_rng(hash((int(wtype), *shape)) % 2**32)
    w = random_weights(wtype, n, k, rng)
    x = rng.standard_normal((m, k)).astype(np.float32)
    act = numpy_ref.quantize_q8(x)
    ref, yabs = numpy_ref.gemm(wtype, w, n, k, act, with_abs=True)
    for p in C_PATHS:
        api.set_kernel_path(p)
        y = api.gemm(wtype, w, n, k, act)
        err = np.abs(y - ref) - numpy_ref.TOLERANCE * yabs
        assert (err <= 1e-30).all(), f"{p}: worst {float(np.max(np.abs(y - ref) / (yabs + 1e-30)))}"


@pytest.mark.parametrize("wtype", GGML_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("codes", ["random", "min", "max"])
def test_integer_parts_are_exact(wtype, codes):
    """Scales of exactly 1.0 make every result an integer below 2**24: all paths must agree bit for bit."""
    n, k, m = 9, 512, 3
    rng = np.random.default_rng(3)
    w = random_weights(wtype, n, k, rng, unit_scales=True, codes=codes)
    act = unit_activations(m, k, rng, extreme=codes != "random")
    ref = numpy_ref.gemm(wtype, w, n, k, act)
    assert np.all(ref == np.round(ref))  # the K-quants' sub-block scales multiply the sums: still integers
    for p in C_PATHS:
        api.set_kernel_path(p)
        np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act), ref, err_msg=p)


@pytest.mark.parametrize(("wtype", "fill", "value"), [
    (WType.Q5_0, 0xFF, 15), (WType.Q5_0, 0x00, -16),  # codes 31 / 0, qh all ones / zeros: w = d*(q - 16)
    (WType.Q4_1, 0xFF, 15 + 1), (WType.Q4_1, 0x00, 0 + 1),  # w = d*q + m with d = m = 1
    (WType.Q5_1, 0xFF, 31 + 1), (WType.Q5_1, 0x00, 0 + 1),
    (WType.Q2_K, 0xFF, 15 * 3 - 15), (WType.Q2_K, 0x00, 0),  # w = d*sc*q - dmin*m: sc = m = 15, q = 3
    (WType.Q3_K, 0xFF, 31 * (7 - 4)), (WType.Q3_K, 0x00, -32 * (0 - 4)),  # w = d*sc*(q - 4), sc = 63 - 32 / 0 - 32
    (WType.Q5_K, 0xFF, 63 * 31 - 63), (WType.Q5_K, 0x00, 0)], ids=str)  # 6-bit sc = m = 63, q = 31 (bit 4 from qh)
def test_extreme_codes_of_each_block_against_hand_computed_value(wtype, fill, value):
    """Every code at its extreme (the high bits from qh / hmask included) against activations of -127: a
    closed form (three blocks or super-blocks a row; every partial sum a multiple of 64 below 2**30: exact)."""
    n, k = 3, 3 * BLOCK[wtype][0]
    rng = np.random.default_rng(13)
    w = random_weights(wtype, n, k, rng, unit_scales=True, codes="max" if fill else "min")
    act = unit_activations(2, k, rng)
    act.qs[:] = -127
    act.sums[:] = -127 * 32
    want = np.full((2, n), value * -127 * k, np.float32)
    np.testing.assert_array_equal(numpy_ref.gemm(wtype, w, n, k, act), want)
    for p in C_PATHS:
        api.set_kernel_path(p)
        np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act), want, err_msg=p)


def test_extreme_codes_against_hand_computed_value():
    """Q4_0 code 15 (w = 7d) and 0 (w = -8d) against activations of +-127: the value is known in closed form."""
    n, k = 2, 64
    rng = np.random.default_rng(4)
    for code_byte, per in ((0xFF, 7), (0x00, -8)):
        w = random_weights(WType.Q4_0, n, k, rng, unit_scales=True, codes="max" if code_byte else "min")
        act = unit_activations(1, k, rng)
        act.qs[:] = -127
        act.sums[:] = -127 * 32
        for p in C_PATHS:
            api.set_kernel_path(p)
            np.testing.assert_array_equal(api.gemm(WType.Q4_0, w, n, k, act), np.full((1, n), per * -127 * k))


@pytest.mark.parametrize("wtype", [WType.Q4_0, WType.Q8_0, *LEGACY_TYPES, *K_TYPES], ids=lambda t: t.name)
def test_zero_scales_give_zero(wtype):
    n, k = 5, 256
    rng = np.random.default_rng(5)
    w = random_weights(wtype, n, k, rng)
    blk = w.reshape(n * (k // BLOCK[wtype][0]), -1)
    if wtype in (WType.Q3_K, WType.Q6_K):  # d ends the block
        blk[:, -2:] = 0
    elif wtype == WType.Q2_K:
        blk[:, 80:84] = 0  # d and dmin
    elif wtype in (WType.Q4_1, WType.Q5_1, WType.Q4_K, WType.Q5_K):
        blk[:, :4] = 0  # d and m (dmin)
    else:
        blk[:, :2] = 0
    act = numpy_ref.quantize_q8(rng.standard_normal((2, k)).astype(np.float32))
    for p in C_PATHS:
        api.set_kernel_path(p)
        assert not api.gemm(wtype, w, n, k, act).any()


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("unit", [False, True])
def test_int4_with_zero_points(group, unit):
    n, k, m = 11, 512, 3
    rng = np.random.default_rng(group)
    codes, scales, zeros = random_int4g(n, k, group, rng, unit_scales=unit)
    act = unit_activations(m, k, rng) if unit else numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32))
    ref, yabs = numpy_ref.gemm_int4g(codes, scales, zeros, group, n, k, act, with_abs=True)
    # against a plain dequantized float product
    q = np.concatenate([codes.reshape(n, -1, 16) & 15, codes.reshape(n, -1, 16) >> 4], axis=-1).reshape(n, k)
    wf = (q.astype(np.float32) - np.repeat(zeros, group, axis=1)) * np.repeat(scales, group, axis=1)
    xf = (act.qs.reshape(m, -1, 32) * act.d[..., None]).reshape(m, k)
    np.testing.assert_allclose(ref, xf @ wf.T, rtol=1e-4, atol=1e-3 * float(np.abs(xf @ wf.T).max()) * 1e-2)
    for p in C_PATHS:
        api.set_kernel_path(p)
        y = api.gemm_int4g(codes, scales, zeros, group, n, k, act)
        if unit:
            np.testing.assert_array_equal(y, ref, err_msg=p)
        else:
            assert (np.abs(y - ref) <= numpy_ref.TOLERANCE * yabs + 1e-30).all(), p


def test_float_product_matches_dequantized_weights():
    """The kernel result is the product of the dequantized weights and activations (gguf-py decoding)."""
    gguf = pytest.importorskip("gguf", reason="gguf-py quantizes the reference weights")
    rng = np.random.default_rng(6)
    n, k = 40, 576
    wf = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    act = numpy_ref.quantize_q8(x)
    xf = (act.qs.reshape(2, -1, 32) * act.d[..., None]).reshape(2, k)
    for wtype in (WType.Q4_0, WType.Q8_0, *LEGACY_TYPES):
        gt = gguf.GGMLQuantizationType(int(wtype))
        w = gguf.quants.quantize(wf, gt)
        want = xf @ gguf.quants.dequantize(w, gt).T
        got = api.gemm(wtype, w, n, k, act)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_repack_is_identical_in_c_and_numpy_and_keeps_results():
    rng = np.random.default_rng(7)
    for n in (1, 2, 7, 16):
        w = random_weights(WType.Q4_0, n, 256, rng)
        act = unit_activations(2, 256, rng)
        for wt, c_fn, np_fn in ((WType.Q4_0X2, api.repack_q4_0x2, numpy_ref.repack_q4_0x2),
                                (WType.Q4_0X8, api.repack_q4_0x8, numpy_ref.repack_q4_0x8)):
            packed = c_fn(w, n, 256)
            np.testing.assert_array_equal(packed, np_fn(w, n, 256))
            api.set_kernel_path("scalar")
            np.testing.assert_array_equal(api.gemm(wt, packed, n, 256, act), api.gemm(WType.Q4_0, w, n, 256, act))


@pytest.mark.parametrize("plain, packed_type, c_fn, np_fn",
                         [(WType.Q8_0, WType.Q8_0X8, api.repack_q8_0x8, numpy_ref.repack_q8_0x8),
                          (WType.Q5_0, WType.Q5_0X8, api.repack_q5_0x8, numpy_ref.repack_q5_0x8)],
                         ids=lambda v: v.name if isinstance(v, WType) else "")
def test_x8_repack_is_identical_in_c_and_numpy(plain, packed_type, c_fn, np_fn):
    rng = np.random.default_rng(11)
    for n in (1, 8, 13):
        w = random_weights(plain, n, 96, rng, codes="min" if n == 8 else "random")
        packed = c_fn(w, n, 96)
        np.testing.assert_array_equal(packed, np_fn(w, n, 96))
        codes, scale, _ = numpy_ref.decode(packed_type, packed, n, 96)  # the layout decodes to the plain values
        want_codes, want_scale, _ = numpy_ref.decode(plain, w, n, 96)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(scale, want_scale)
        act = unit_activations(2, 96, rng)
        api.set_kernel_path("scalar")
        np.testing.assert_array_equal(api.gemm(packed_type, packed, n, 96, act), api.gemm(plain, w, n, 96, act))


@pytest.mark.parametrize("wtype", [WType.Q4_0, WType.Q5_0], ids=lambda t: t.name)  # the types with 4-row products
def test_threads_do_not_change_results(wtype):
    rng = np.random.default_rng(8)
    n, k = 1000, 2048
    w = random_weights(wtype, n, k, rng)
    act = numpy_ref.quantize_q8(rng.standard_normal((3, k)).astype(np.float32))
    for p in C_PATHS:
        api.set_kernel_path(p)
        one = api.gemm(wtype, w, n, k, act, nthreads=1)
        np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act, nthreads=2), one)
        np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act, nthreads=5), one)


def test_linear_f32_equals_quantize_then_gemm():
    rng = np.random.default_rng(9)
    n, k = 70, 576
    w = random_weights(WType.Q8_0, n, k, rng)
    x = rng.standard_normal((4, k)).astype(np.float32)
    for p in C_PATHS:
        api.set_kernel_path(p)
        np.testing.assert_array_equal(api.linear_f32(WType.Q8_0, w, n, k, x), api.gemm(WType.Q8_0, w, n, k, x))


def test_unavailable_or_unknown_path_is_a_clear_error():
    with pytest.raises(api.KernelError, match="not supported by this CPU"):
        api.set_kernel_path("sve" if "sve" not in C_PATHS else "avx2")
    with pytest.raises(api.KernelError, match="unknown kernel path"):
        api.set_kernel_path("fastest")


def test_env_var_forces_a_path():
    code = "from qkiln.kernels import api; print(api.kernel_path())"
    for want in ("scalar", "numpy"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "QKILN_KERNEL": want})
        assert out.stdout.strip() == want
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "QKILN_KERNEL": "neon" if "neon" not in C_PATHS else "avx2"})
    assert bad.returncode != 0 and "not supported by this CPU" in bad.stderr


def test_env_var_forced_paths_run_the_legacy_types():
    """QKILN_KERNEL=<path> in a fresh process runs Q5_0, Q4_1 and Q5_1 on that path, bit-equal to the NumPy
    reference with unit scales (the integer parts) and within TOLERANCE with random ones."""
    code = (
        "import sys; import numpy as np; sys.path.insert(0, sys.argv[1])\n"
        "from qkiln.kernels import api, numpy_ref\n"
        "from qkiln.kernels.types import WType\n"
        "from conftest_helpers import random_weights, unit_activations\n"
        "rng = np.random.default_rng(21); out = [api.kernel_path()]\n"
        "for t in (WType.Q5_0, WType.Q4_1, WType.Q5_1):\n"
        "    w = random_weights(t, 11, 320, rng, unit_scales=True); act = unit_activations(2, 320, rng)\n"
        "    exact = np.array_equal(api.gemm(t, w, 11, 320, act), numpy_ref.gemm(t, w, 11, 320, act))\n"
        "    w = random_weights(t, 11, 320, rng); act = numpy_ref.quantize_q8(rng.standard_normal((2, 320)))\n"
        "    ref, yabs = numpy_ref.gemm(t, w, 11, 320, act, with_abs=True)\n"
        "    close = bool((np.abs(api.gemm(t, w, 11, 320, act) - ref) <= numpy_ref.TOLERANCE * yabs + 1e-30).all())\n"
        "    out.append(f'{t.name}={exact and close}')\n"
        "print(' '.join(out))\n")
    assert C_PATHS
    for p in C_PATHS:
        r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], capture_output=True, text=True,
                           env={**os.environ, "QKILN_KERNEL": p})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [p, "Q5_0=True", "Q4_1=True", "Q5_1=True"]


def test_numpy_path_serves_the_same_api():
    rng = np.random.default_rng(10)
    w = random_weights(WType.Q4_0, 8, 256, rng)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    api.set_kernel_path("scalar")
    c = api.gemm_q4_0(w, x, 8, 256)
    api.set_kernel_path("numpy")
    assert api.kernel_path() == "numpy"
    np.testing.assert_allclose(api.gemm_q4_0(w, x, 8, 256), c, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(api.gemv_q4_0(w, x[0], 8, 256), c[0], rtol=1e-5, atol=1e-6)


def test_no_compiler_falls_back_to_numpy(tmp_path):
    """A machine without a C compiler still runs every product, through the NumPy path."""
    code = ("import numpy as np; from qkiln.kernels import api; from qkiln.kernels.types import WType;"
            "w = np.zeros(4 * 18, np.uint8); y = api.gemm(WType.Q4_0, w, 4, 32, np.ones((1, 32), np.float32));"
            "print(api.kernel_path(), y.shape)")
    env = {**os.environ, "QKILN_CC": "/nonexistent/cc", "QKILN_KERNELS_CACHE": str(tmp_path)}
    env.pop("QKILN_KERNEL", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["numpy", "(1,", "4)"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("wtype", [WType.Q4_0, WType.Q8_0, *LEGACY_TYPES, WType.Q4_0X2, *X8_TYPES],
                         ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(9, 96, 2), (13, 544, 1), (4, 32, 3)], ids=str)
def test_odd_block_counts(wtype, shape):
    """K/32 odd (3, 17, 1 blocks): the two-blocks-per-vector kernels must finish the last block alone."""
    n, k, m = shape
    rng = np.random.default_rng(k)
    for unit in (False, True):
        w = random_weights(wtype, n, k, rng, unit_scales=unit)
        act = unit_activations(m, k, rng) if unit else numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32))
        ref, yabs = numpy_ref.gemm(wtype, w, n, k, act, with_abs=True)
        for p in C_PATHS:
            api.set_kernel_path(p)
            y = api.gemm(wtype, w, n, k, act)
            if unit:
                np.testing.assert_array_equal(y, ref, err_msg=p)
            else:
                assert (np.abs(y - ref) <= numpy_ref.TOLERANCE * yabs + 1e-30).all(), p


def test_c_selftest_natively(tmp_path):
    """The same C self-test the qemu runs use, on this machine's paths (needs a C compiler)."""
    from qkiln.kernels.build import build_test_binary, find_cc, host_arch

    cc = find_cc()
    if cc is None:
        pytest.skip("no C compiler")
    exe = build_test_binary(tmp_path / "selftest", cc, host_arch(), Path(__file__).parent / "kernel_selftest.c")
    r = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout
    best = next(p for p in ("avx512", "avx2", "i8mm", "sve", "dotprod", "neon", "scalar") if p in C_PATHS)
    assert r.stdout.startswith(f"auto={best} ")
    for p in C_PATHS:
        assert f"path {p}: ok" in r.stdout


def _int4_edge_cases(n: int, k: int, group: int, rng: np.random.Generator, case: str):
    """Unit-scale INT4 arrays for one edge case: extreme codes (all 0 / all 15) against zero points 15 / 0, or
    zero scales on every other row."""
    codes, scales, zeros = random_int4g(n, k, group, rng, unit_scales=True)
    if case == "codes0_zero15":
        codes[:] = 0x00
        zeros[:] = 15
    elif case == "codes15_zero0":
        codes[:] = 0xFF
        zeros[:] = 0
    elif case == "zero_scales":
        scales[::2] = 0.0  # every other row
    return codes, scales, zeros


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 7, 8, 13, 37])
def test_int4gx8_repack_is_identical_in_c_and_numpy(group, n):
    k = 256
    rng = np.random.default_rng(n * group)
    codes, scales, zeros = random_int4g(n, k, group, rng)
    packed = api.repack_int4gx8(codes, scales, zeros, group, n, k)
    np.testing.assert_array_equal(packed, numpy_ref.repack_int4gx8(codes, scales, zeros, group, n, k))
    # the NumPy decode of the repacked bytes is the INT4 decode: same integer codes, same scales
    for got, want in zip(numpy_ref.decode_int4gx8(packed, group, n, k),
                         numpy_ref.decode_int4g(codes, scales, zeros, group, n, k), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("case", ["random", "unit", "codes0_zero15", "codes15_zero0", "zero_scales"])
def test_int4gx8_paths_equal_int4_reference(group, case):
    """Every path's INT4GX8 product equals the INT4 NumPy reference: bit for bit where the arithmetic is exact
    (unit scales, extreme codes and zero points against +-127 activations), within TOLERANCE otherwise."""
    n, k, m = 13, 512, 3  # odd rows: a partial 8-row group
    rng = np.random.default_rng(group + len(case))
    if case == "random":
        codes, scales, zeros = random_int4g(n, k, group, rng)
        act = numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32))
    else:
        codes, scales, zeros = _int4_edge_cases(n, k, group, rng, case)
        act = unit_activations(m, k, rng, extreme=case != "unit")
        act.qs[0] = -127  # a row of -127: the most negative activation the quantizer emits
        act.sums[0] = -127 * 32
    exact = case != "random"
    ref, yabs = numpy_ref.gemm_int4g(codes, scales, zeros, group, n, k, act, with_abs=True)
    if case == "codes0_zero15":
        np.testing.assert_array_equal(ref[0], np.full(n, -15 * -127 * k, np.float32))
    if case == "zero_scales":
        assert not ref[:, ::2].any()
    packed = api.repack_int4gx8(codes, scales, zeros, group, n, k)
    np.testing.assert_array_equal(numpy_ref.gemm_int4gx8(packed, group, n, k, act), ref)
    for p in C_PATHS:
        api.set_kernel_path(p)
        for y in (api.gemm_int4gx8(packed, group, n, k, act), api.gemm_int4gx8(packed, group, n, k, act, nthreads=1)):
            if exact:
                np.testing.assert_array_equal(y, ref, err_msg=p)
            else:
                assert (np.abs(y - ref) <= numpy_ref.TOLERANCE * yabs + 1e-30).all(), p


def test_int4_linear_runs_the_path_layout():
    """Int4GLinear repacks to INT4GX8 exactly where the path has that kernel (avx512) and gives the INT4 product."""
    n, k, group = 21, 256, 128
    rng = np.random.default_rng(12)
    codes, scales, zeros = random_int4g(n, k, group, rng)
    x = rng.standard_normal((2, k)).astype(np.float32)
    act = numpy_ref.quantize_q8(x)
    ref, yabs = numpy_ref.gemm_int4g(codes, scales, zeros, group, n, k, act, with_abs=True)
    for p in [*C_PATHS, "numpy"]:
        api.set_kernel_path(p)
        lin = api.Int4GLinear(codes, scales, zeros, group, n, k)
        assert lin.wtype == (WType.INT4GX8 if p == "avx512" else WType.INT4G)
        assert (np.abs(lin(x) - ref) <= numpy_ref.TOLERANCE * yabs + 1e-30).all(), p


def test_c_block_sizes_are_gguf_constants():
    """common.h restates ggml's block sizes for C; they must equal gguf-py's GGML_QUANT_SIZES (the one table)."""
    import re
    from pathlib import Path

    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    import qkiln.kernels

    text = (Path(qkiln.kernels.__file__).parent / "src" / "common.h").read_text()
    defines = {m[1]: int(m[2]) for m in re.finditer(r"^#define (\w+) (\d+)", text, re.M)}
    assert (defines["QK8"], defines["Q4_0_BYTES"]) == GGML_QUANT_SIZES[GGMLQuantizationType.Q4_0]
    assert (defines["QK8"], defines["Q8_0_BYTES"]) == GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
    for name in ("Q5_0", "Q4_1", "Q5_1"):
        assert (defines["QK8"], defines[f"{name}_BYTES"]) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        assert (defines["QKK"], defines[f"{name}_BYTES"]) == GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    assert {int(w): size for w, size in BLOCK.items()} == {int(w): GGML_QUANT_SIZES[GGMLQuantizationType(int(w))] for w in BLOCK}


def test_every_exported_function_is_in_the_public_header():
    """qkiln_kernels.h is the one C ABI: every function Python's ctypes tables call is declared there (and
    common.h includes it in every source, so the compiler checks it against the definitions)."""
    import re
    from pathlib import Path

    import qkiln.kernels

    root = Path(qkiln.kernels.__file__).parent
    header = set(re.findall(r"\b(qk_\w+)\s*\(", (root / "include" / "qkiln_kernels.h").read_text()))
    called = {name for path in root.glob("*.py") for name in re.findall(r'"(qk_\w+)"', path.read_text())}
    called |= {name for path in root.glob("*.py") for name in re.findall(r"lib\.(qk_\w+)\(", path.read_text())}
    assert called - header == set()
