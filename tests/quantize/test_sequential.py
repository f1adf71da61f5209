"""The single-pass sequential layer: its forward is the runtime's layer, its Hessians those of the inputs
each group really sees, and it is deterministic whatever the number of worker threads."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.model.names import INPUT_GROUPS, LINEARS, NORMS
from qkiln.model.source import DictSource
from qkiln.quantize.hessian import accumulate_hessian, empty_hessian
from qkiln.quantize.matmul import F32Matmul
from qkiln.quantize.sequential import run_layer
from qkiln.runtime.llama import LlamaModel


def _setup(tiny_config, llama_weights, n=5, seq=24, **overrides):
    cfg = tiny_config(num_attention_heads=4, num_key_value_heads=2, **overrides)
    w = llama_weights(cfg, seed=3)
    model = LlamaModel(DictSource(cfg, w))
    rng = np.random.default_rng(0)
    h = model.embed(rng.integers(0, cfg.vocab_size, size=(n, seq)))
    layer = {n_: w[f"model.layers.0.{n_}.weight"] for n_ in (*LINEARS, *NORMS)}
    return cfg, model, h, layer


class _Keep:
    """Quantize nothing: record each group's Hessian and hand back the original weights."""

    def __init__(self, layer, transform=None):
        self.layer, self.transform, self.seen = layer, transform, {}

    def __call__(self, group, hess):
        self.seen[group] = hess
        return {n: (self.transform(self.layer[n]) if self.transform else self.layer[n]) for n in INPUT_GROUPS[group]}


@pytest.mark.parametrize("threads", [1, 2])
def test_forward_equals_runtime_layer_and_hessians_equal_observed(tiny_config, llama_weights, threads):
    cfg, model, h, layer = _setup(tiny_config, llama_weights)
    want = model.layer(0, h)
    observed: dict[str, tuple] = {}

    def observer(name, x):
        if name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            group = next(g for g, names in INPUT_GROUPS.items() if name in names)
            observed[group] = accumulate_hessian(*observed.get(group, empty_hessian(x.shape[1])), x)

    model.layer(0, h, observer=observer)
    keep = _Keep(layer)
    got = run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, keep, F32Matmul(),
                    batch_samples=2, threads=threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert list(keep.seen) == list(INPUT_GROUPS)  # called in the layer's order
    for group, (hess, n_tok) in observed.items():
        assert n_tok == h.shape[0] * h.shape[1]
        np.testing.assert_allclose(keep.seen[group], hess, rtol=1e-5, atol=1e-6 * np.abs(hess).max())


def test_later_groups_see_the_quantized_earlier_ones(tiny_config, llama_weights):
    """o_proj's Hessian must come from attention over the weights q/k/v were quantized to."""
    cfg, model, h, layer = _setup(tiny_config, llama_weights)
    exact, coarse = _Keep(layer), _Keep(layer, transform=lambda w: np.round(w * 4) / 4)
    run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, exact, F32Matmul())
    run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, coarse, F32Matmul())
    np.testing.assert_array_equal(exact.seen["attn_in"], coarse.seen["attn_in"])  # before any quantization
    for group in ("attn_out", "mlp_in", "mlp_out"):
        assert not np.allclose(exact.seen[group], coarse.seen[group], rtol=1e-3)


def test_threads_do_not_change_results(tiny_config, llama_weights):
    cfg, model, h, layer = _setup(tiny_config, llama_weights, n=7)
    runs = []
    for threads in (1, 2):
        keep = _Keep(layer)
        out = run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, keep, F32Matmul(),
                        batch_samples=2, threads=threads)
        runs.append((out, keep.seen))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    for group in INPUT_GROUPS:
        np.testing.assert_array_equal(runs[0][1][group], runs[1][1][group])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("threads", [1, 2])
def test_statistics_pass_sees_the_layers_inputs_and_leaves_h(tiny_config, llama_weights, threads, dtype):
    """AWQ's statistics pass: the same Hessians as a full pass, each group's mean |x| as the runtime's
    inputs give it, h untouched, and the same bytes whatever the worker count."""
    from qkiln.quantize.matmul import matmul_engine

    cfg, model, h, layer = _setup(tiny_config, llama_weights, n=7)
    full = _Keep(layer)
    run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, full, matmul_engine(dtype), batch_samples=2)
    observed: dict[str, np.ndarray] = {}

    def observer(name, x):
        if name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
            group = next(g for g, names in INPUT_GROUPS.items() if name in names)
            observed[group] = observed.get(group, 0) + np.abs(x).sum(axis=0, dtype=np.float64)

    model.layer(0, h, observer=observer)
    before = h.copy()
    keep, abs_means = _Keep(layer), {}
    got = run_layer(h, {n: layer[n] for n in NORMS}, cfg, model.rope, keep, matmul_engine(dtype), batch_samples=2,
                    threads=threads, abs_means=abs_means, statistics_only=True)
    assert got is h
    np.testing.assert_array_equal(h, before)
    assert list(abs_means) == list(INPUT_GROUPS) == list(keep.seen)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for group in INPUT_GROUPS:
        np.testing.assert_array_equal(keep.seen[group], full.seen[group])
        want = observed[group] / (h.shape[0] * h.shape[1])
        np.testing.assert_allclose(abs_means[group], want, rtol=tol, atol=tol * want.max())
    if threads == 2:
        one, one_abs = _Keep(layer), {}
        run_layer(h, {n: layer[n] for n in NORMS}, cfg, model.rope, one, matmul_engine(dtype), batch_samples=2,
                  threads=1, abs_means=one_abs, statistics_only=True)
        for group in INPUT_GROUPS:
            np.testing.assert_array_equal(one_abs[group], abs_means[group])


def test_no_hessian_when_not_needed(tiny_config, llama_weights):
    cfg, model, h, layer = _setup(tiny_config, llama_weights)
    keep = _Keep(layer)
    got = run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, keep, F32Matmul(), need_hessian=False)
    assert all(v is None for v in keep.seen.values()) and len(keep.seen) == 4
    np.testing.assert_allclose(got, model.layer(0, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inter", [96, 72])  # gate/up fused in the product's tiles, and not (72 % 16 != 0)
def test_bfloat16_engine_tracks_float32(tiny_config, llama_weights, inter):
    """bfloat16 products (AMX or its NumPy definition) stay within bfloat16's rounding of float32's."""
    from qkiln.quantize.matmul import matmul_engine

    cfg, model, h, layer = _setup(tiny_config, llama_weights, intermediate_size=inter)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        keep = _Keep(layer)
        out = run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, keep, matmul_engine(dtype))
        runs[dtype] = (out, keep.seen)
    (o32, h32), (o16, h16) = runs["float32"], runs["bfloat16"]
    assert not np.array_equal(o32, o16)  # the engine really changed the arithmetic
    np.testing.assert_allclose(o16, o32, atol=2e-2 * np.abs(o32).max())
    for group in INPUT_GROUPS:
        np.testing.assert_allclose(h16[group], h32[group], atol=2e-2 * np.abs(h32[group]).max())


def test_layer_buffers_lend_distinct_aligned_arrays_and_reuse_them():
    from qkiln.quantize.sequential import LayerBuffers

    bufs = LayerBuffers()
    a = bufs.take("g", (4, 16))
    b = bufs.take("g", (4, 16))
    assert not np.shares_memory(a, b)  # two workers at once get two arrays
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0 and a.shape == (4, 16)
    bufs.give("g", a)
    c = bufs.take("g", (2, 16))  # a smaller request reuses the returned array
    assert c.ctypes.data == a.ctypes.data
    with bufs.borrow("g", (4, 16)) as d:
        assert not np.shares_memory(d, b) and not np.shares_memory(d, c)
    assert bufs.get("x", 10).size == 10 and bufs.get("x", 10).ctypes.data == bufs.get("x", 5).ctypes.data


def test_a_failing_batch_is_raised_not_waited_for(tiny_config, llama_weights, monkeypatch):
    """A batch that raises must not leave the next batch of its Gram lane waiting for its turn forever."""
    import threading

    import qkiln.quantize.sequential as sequential

    cfg, model, h, layer = _setup(tiny_config, llama_weights, n=12)
    calls = []
    real = sequential.rms_norm

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("batch failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(sequential, "rms_norm", flaky)
    raised = []

    def go():
        try:
            run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, _Keep(layer), F32Matmul(),
                      batch_samples=1, threads=2)
        except RuntimeError as e:
            raised.append(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive() and raised and "batch failed" in str(raised[0])


def test_bfloat16_activation_storage_changes_no_bit(tiny_config, llama_weights):
    """norm(h) and the MLP activation are stored in bfloat16 for the bfloat16 engine: exactly what its
    products would have rounded float32 copies to, so outputs and Hessians keep every bit."""
    from qkiln.quantize.matmul import matmul_engine

    cfg, model, h, layer = _setup(tiny_config, llama_weights, intermediate_size=96)
    runs = []
    for dtype in (np.float32, None):
        engine = matmul_engine("bfloat16")
        assert engine.activation_dtype.itemsize == 2
        if dtype is not None:
            engine.activation_dtype = np.dtype(dtype)
        keep = _Keep(layer)
        out = run_layer(h.copy(), {n: layer[n] for n in NORMS}, cfg, model.rope, keep, engine, batch_samples=2)
        runs.append((out, keep.seen))
    (o32, h32), (o16, h16) = runs
    np.testing.assert_array_equal(o16, o32)
    for group in INPUT_GROUPS:
        np.testing.assert_array_equal(h16[group], h32[group])


def test_mean_hessian_in_place_equals_the_float64_mean():
    from qkiln.quantize.hessian import HessianSum, mean_hessian
    from qkiln.quantize.sequential import SUM_LANES, sum_lanes

    rng = np.random.default_rng(0)
    x = rng.standard_normal((700, 300)).astype(np.float32)
    g = x.T @ x
    hs = HessianSum(300)
    hs.add_gram(g, 700)
    want = hs.mean().astype(np.float32)
    got = mean_hessian(g, 700)
    assert got is g
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(mean_hessian(hs.sum, 700), want)  # the float32 engine's float64 sum
    assert sum_lanes(1536) == SUM_LANES and sum_lanes(14336) == 1  # an 8B down_proj input: one 822 MB sum
