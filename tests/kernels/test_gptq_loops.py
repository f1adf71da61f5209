"""The C GPTQ loops (qkiln/kernels/gptq.py) give the same bits as the NumPy definitions they replace."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.kernels import api
from qkiln.kernels import gptq as c_loops
from qkiln.quantize.gptq import gptq_quantize
from qkiln.quantize.int_grid import SHRINK
from qkiln.quantize.registry import get_scheme

pytestmark = pytest.mark.skipif(not c_loops.available(), reason="the C kernel library cannot be built here")


def _both(monkeypatch: pytest.MonkeyPatch, fn):
    """(fn() with the best C variant (AVX-512, AVX2 or portable), fn() with QKILN_KERNEL=numpy — the NumPy
    definitions); the portable C variant is run too and must equal the best one."""
    got_c = fn()
    monkeypatch.setenv("QKILN_KERNEL", "scalar")  # any C path but avx512: portable
    got_portable = fn()
    monkeypatch.setenv("QKILN_KERNEL", "numpy")
    assert not c_loops.available()
    got_np = fn()
    monkeypatch.delenv("QKILN_KERNEL")
    a, b = (got_c.codes, got_portable.codes) if hasattr(got_c, "codes") else (got_c, got_portable)
    if isinstance(a, dict):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"portable vs best variant: {k}")
    else:
        np.testing.assert_array_equal(a, b, err_msg="portable vs best variant")
    return got_c, got_np


def _problem(rows: int, cols: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A weight with outliers and a correlated, unevenly scaled Hessian with a dead input."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    w[rng.random(w.shape) < 0.01] *= 20
    x = rng.standard_normal((4 * cols, cols)) @ (np.eye(cols) + 0.3 * rng.standard_normal((cols, cols)))
    x *= rng.uniform(0.1, 3.0, size=cols)
    x[:, 3] = 0.0
    return w, 2 * x.T @ x / len(x)


@pytest.mark.parametrize("scheme_name", ["int4_g64_asym", "int4_g32", "int8", "int4_pc_asym", "q4_0", "q8_0",
                                         "q5_1", "q4_k", "q6_k"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_scan_and_fit_match_numpy(monkeypatch: pytest.MonkeyPatch, scheme_name: str, act_order: bool):
    cols = 256 if scheme_name.endswith("_k") else 192
    w, h = _problem(45, cols, seed=len(scheme_name) + act_order)  # 45 rows: a partial vector of 4 rows
    scheme = get_scheme(scheme_name)
    qc, qn = _both(monkeypatch, lambda: gptq_quantize(w, h, scheme, act_order=act_order, block_size=64))
    np.testing.assert_array_equal(qc.codes, qn.codes)
    assert qc.params.keys() == qn.params.keys()
    for k in qc.params:
        np.testing.assert_array_equal(qc.params[k], qn.params[k], err_msg=k)


@pytest.mark.parametrize("name", ["int4_g32", "int4_g32_asym", "int4_g64", "int4_g64_asym", "int8", "int4_pc",
                                  "int4_pc_asym"])
def test_int_fit_matches_numpy_on_edge_blocks(monkeypatch: pytest.MonkeyPatch, name: str):
    rng = np.random.default_rng(len(name))
    rows, cols = 37, 128
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0] = 0.0  # zeros
    w[1] = 0.37  # constant
    w[2] *= 1e-30  # tiny (scales round into float16 subnormals or to zero)
    w[3] *= 3e4  # huge, still within float16 scales at 4 bits
    w[4, :64] = -2.0  # one-sided
    imp = rng.uniform(0.0, 5.0, cols).astype(np.float32)
    imp[::7] = 0.0
    scheme = get_scheme(name)
    pc, pn = _both(monkeypatch, lambda: scheme.fit(w, imp))
    assert pc.keys() == pn.keys()
    for k in pc:
        np.testing.assert_array_equal(pc[k], pn[k], err_msg=k)
    assert pc["scale"].dtype == np.float16


@pytest.mark.parametrize("name", ["int4_g32", "int4_g32_asym", "int8"])
def test_int_fit_matches_numpy_across_magnitudes(monkeypatch: pytest.MonkeyPatch, name: str):
    """Rows scaled log-uniformly over 1e-9..1e4: the scales fall on float16 subnormals, normals of every
    exponent and rounding ties, which the C fit rounds with its own float16 arithmetic."""
    rng = np.random.default_rng(11)
    rows, cols = 301, 64
    w = rng.standard_normal((rows, cols)).astype(np.float32) * (10.0 ** rng.uniform(-9, 4, (rows, 1))).astype(np.float32)
    imp = rng.uniform(0.0, 2.0, cols).astype(np.float32)
    scheme = get_scheme(name)
    pc, pn = _both(monkeypatch, lambda: scheme.fit(w, imp))
    for k in pc:
        np.testing.assert_array_equal(pc[k], pn[k], err_msg=k)


def test_int_fit_weighting_changes_the_choice():
    """The search is not a no-op: on a heavy-tailed row the weighted fit shrinks some ranges, and each
    choice is one of the SHRINK candidates with no larger weighted error than the full range."""
    rng = np.random.default_rng(7)
    w = rng.standard_t(3, size=(64, 64)).astype(np.float32)
    imp = np.ones(64, np.float32)
    scheme = get_scheme("int4_g64_asym")
    full = scheme.fit(w)  # unweighted: plain min/max range
    fitted = scheme.fit(w, imp)
    assert (fitted["scale"].astype(np.float32) < full["scale"].astype(np.float32)).sum() > 10
    err = lambda p: ((scheme.decode(scheme.encode(w, p), p) - w) ** 2).sum(axis=1)  # noqa: E731
    assert (err(fitted) <= err(full) + 1e-6).all()
    assert SHRINK[0] == 1.0


def test_scan_block_rejects_bad_ranges():
    w1 = np.zeros((4, 8), np.float32)
    args = (w1, np.zeros_like(w1), np.zeros((4, 8), np.uint8), np.eye(4, dtype=np.float32), 0, 5,
            np.zeros(4, np.int32), np.ones((1, 8), np.float32), np.ones((1, 8), np.float32),
            np.zeros((1, 8), np.float32), 8.0, 0.0, 15.0)
    with pytest.raises(ValueError):
        c_loops.scan_block(*args)


def test_variant_in_use(monkeypatch):
    """The loops report the variant that ran: AVX-512 where the CPU has it, else AVX2 where it has that, else
    the portable one; a forced QKILN_KERNEL runs that variant (or refuses), and QKILN_KERNEL=numpy runs no C
    loop at all."""
    from qkiln.kernels.elementwise import variant_name

    if not c_loops.available():
        pytest.skip("the C library is not built here")
    w, h = _problem(16, 64, seed=1)
    best = "avx512" if variant_name() == "avx512" else "avx2" if "avx2" in api.available_paths() else "portable"
    for forced, ran in (("", best), ("scalar", "portable"), ("avx512", "avx512"), ("numpy", None)):
        if forced == "avx512" and best != "avx512":
            continue  # cannot run here; refusing is test_forced_unavailable_variant's subject
        monkeypatch.setenv("QKILN_KERNEL", forced)
        c_loops.reset_path()
        gptq_quantize(w, h, get_scheme("int4_g32"))
        assert c_loops.last_path() == ran, (forced, c_loops.last_path())
