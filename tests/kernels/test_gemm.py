"""Batched products (many activation rows in one call: prompts, evaluation) equal the per-token products on every
C path: bit for bit where the arithmetic is exact (unit scales, every result an integer below 2**24), within
numpy_ref.TOLERANCE of the absolute term sum otherwise — for every weight layout, with row counts that are not
multiples of the 16-row strips and token counts that are not multiples of the 8-token tiles."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from qkiln.kernels import api, numpy_ref
from qkiln.kernels.numpy_ref import Q8Activations
from qkiln.kernels.types import WType

sys.path.insert(0, str(Path(__file__).parent))
from conftest_helpers import random_weights, unit_activations
from test_kernels_native import C_PATHS, _c_library_regardless_of_env, _restore_path  # noqa: F401 (its fixtures)

TYPES = [WType.Q4_0, WType.Q8_0, WType.Q5_0, WType.Q4_1, WType.Q5_1, WType.Q4_K, WType.Q6_K, WType.Q4_0X8,
         WType.Q8_0X8, WType.Q5_0X8, WType.Q4_0X2]
SHAPES = [(9, 512, 13), (40, 256, 3), (33, 1024, 21), (16, 256, 8), (100, 768, 37), (24, 256, 6)]  # (N, K, M)


def _per_token(wtype: WType, w: np.ndarray, n: int, k: int, act: Q8Activations, nthreads=None) -> np.ndarray:
    rows = [api.gemm(wtype, w, n, k, Q8Activations(act.qs[i : i + 1], act.d[i : i + 1], act.sums[i : i + 1]), nthreads)
            for i in range(act.qs.shape[0])]
    return np.concatenate(rows)


def _edge_activations(m: int, k: int, rng: np.random.Generator) -> Q8Activations:
    """Unit scales, codes at +-127 in some rows and all -127 in one (the offsets' corrections at their extremes)."""
    act = unit_activations(m, k, rng, extreme=True)
    act.qs[0] = -127
    act.sums[0] = -127 * 32
    return act


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batched_equals_per_token_exactly_with_unit_scales(wtype, shape):
    n, k, m = shape
    rng = np.random.default_rng(hash((int(wtype), *shape)) % 2**32)
    # K-quants at extreme codes (6-bit scales and mins of 63) leave float32's exact integers: random codes only
    for codes in ("random",) if wtype in (WType.Q4_K, WType.Q6_K) else ("random", "min", "max"):
        w = random_weights(wtype, n, k, rng, unit_scales=True, codes=codes)
        act = unit_activations(m, k, rng) if codes == "random" else _edge_activations(m, k, rng)
        ref = numpy_ref.gemm(wtype, w, n, k, act)
        assert np.all(ref == np.round(ref)) and np.abs(ref).max() < 2**24
        for p in C_PATHS:
            api.set_kernel_path(p)
            np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act), ref, err_msg=f"{p} batched {codes}")
            np.testing.assert_array_equal(_per_token(wtype, w, n, k, act), ref, err_msg=f"{p} per token {codes}")


@pytest.mark.parametrize("wtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batched_equals_per_token_within_tolerance(wtype, shape):
    n, k, m = shape
    rng = np.random.default_rng(hash((int(wtype), *shape, 1)) % 2**32)
    w = random_weights(wtype, n, k, rng)
    act = numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 10, (m, 1)).astype(np.float32))
    ref, yabs = numpy_ref.gemm(wtype, w, n, k, act, with_abs=True)
    for p in C_PATHS:
        api.set_kernel_path(p)
        batched, per_token = api.gemm(wtype, w, n, k, act), _per_token(wtype, w, n, k, act)
        for name, y in (("batched", batched), ("per token", per_token)):
            err = np.abs(y - ref) - numpy_ref.TOLERANCE * yabs
            assert (err <= 1e-30).all(), f"{p} {name}: worst {float(np.max(np.abs(y - ref) / (yabs + 1e-30)))}"
        assert ((np.abs(batched - per_token) - 2 * numpy_ref.TOLERANCE * yabs) <= 1e-30).all(), p


@pytest.mark.parametrize("wtype", [WType.Q4_0X8, WType.Q5_0, WType.Q5_0X8, WType.Q6_K], ids=lambda t: t.name)
def test_batched_threads_do_not_change_results(wtype):
    n, k, m = 200, 512, 29
    rng = np.random.default_rng(7)
    w = random_weights(wtype, n, k, rng)
    act = numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32))
    for p in C_PATHS:
        api.set_kernel_path(p)
        one = api.gemm(wtype, w, n, k, act, nthreads=1)
        for t in (2, 3, 8):
            np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act, nthreads=t), one, err_msg=f"{p} threads {t}")


def test_zero_scales_give_zero_in_batches():
    """A block whose scale is 0 contributes exactly 0 (no NaN from the panel's padding rows either)."""
    n, k, m = 21, 256, 11
    rng = np.random.default_rng(9)
    for wtype in (WType.Q4_0, WType.Q8_0, WType.Q5_0):
        w = random_weights(wtype, n, k, rng)
        bsz = {WType.Q4_0: 18, WType.Q8_0: 34, WType.Q5_0: 22}[wtype]
        w.reshape(-1, bsz)[:, :2] = 0
        act = numpy_ref.quantize_q8(rng.standard_normal((m, k)).astype(np.float32))
        for p in C_PATHS:
            api.set_kernel_path(p)
            np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act), np.zeros((m, n), np.float32), err_msg=p)


@pytest.mark.parametrize("wtype", [t for t in TYPES if t not in (WType.Q4_K, WType.Q6_K)], ids=lambda t: t.name)
def test_one_block_rows_and_single_weight_rows(wtype):
    """K = 32 (one block per row), N = 1 and N = 8 (a strip mostly padding), many activation rows."""
    for n, k, m in [(1, 32, 9), (5, 32, 3), (8, 96, 100), (17, 64, 6)]:
        rng = np.random.default_rng(n * 1000 + k + m)
        w = random_weights(wtype, n, k, rng, unit_scales=True)
        act = unit_activations(m, k, rng)
        ref = numpy_ref.gemm(wtype, w, n, k, act)
        for p in C_PATHS:
            api.set_kernel_path(p)
            for t in (1, 2):
                np.testing.assert_array_equal(api.gemm(wtype, w, n, k, act, nthreads=t), ref, err_msg=f"{p} {n, k, m}")
