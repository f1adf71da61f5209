"""AWQ: folding scales is exact without quantization; the search never loses to RTN on its own proxy."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.model.names import INPUT_GROUPS, LINEARS, NORMS
from qkiln.model.source import DictSource
from qkiln.quantize.awq import (
    GroupStats,
    awq_layer,
    fold_scales,
    rtn_dequant,
    search_clip,
    search_scale,
    tie_heads,
)
from qkiln.quantize.gptq import output_error
from qkiln.quantize.hessian import accumulate_hessian, empty_hessian
from qkiln.quantize.registry import get_scheme
from qkiln.runtime.llama import LlamaModel


def _layer_tensors(weights: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    return {n: weights[f"model.layers.{i}.{n}.weight"] for n in (*LINEARS, *NORMS)}


def test_fold_scales_preserves_logits(tiny_config, llama_weights):
    cfg = tiny_config()  # 4 heads, 2 kv heads: grouped-query attention, tied o_proj scales
    weights = llama_weights(cfg, seed=3)
    rng = np.random.default_rng(0)
    folded = dict(weights)
    for i in range(cfg.num_hidden_layers):
        scales = {
            "attn_in": np.exp(0.5 * rng.standard_normal(cfg.hidden_size)).astype(np.float32),
            "attn_out": tie_heads(np.exp(0.5 * rng.standard_normal(cfg.hidden_size)), cfg).astype(np.float32),
            "mlp_in": np.exp(0.5 * rng.standard_normal(cfg.hidden_size)).astype(np.float32),
            "mlp_out": np.exp(0.5 * rng.standard_normal(cfg.intermediate_size)).astype(np.float32),
        }
        new = fold_scales(_layer_tensors(weights, i), scales, cfg)
        for n, v in new.items():
            folded[f"model.layers.{i}.{n}.weight"] = v
        assert not np.allclose(new["self_attn.v_proj"], weights[f"model.layers.{i}.self_attn.v_proj.weight"])
    ids = rng.integers(0, cfg.vocab_size, size=(2, 24))
    ref = LlamaModel(DictSource(cfg, weights)).forward(ids)
    got = LlamaModel(DictSource(cfg, folded)).forward(ids)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_untied_attn_out_scales_are_refused(tiny_config, llama_weights):
    cfg = tiny_config()
    t = _layer_tensors(llama_weights(cfg), 0)
    with pytest.raises(AssertionError, match="tied"):
        fold_scales(t, {"attn_out": np.linspace(0.5, 2, cfg.hidden_size, dtype=np.float32)}, cfg)


@pytest.fixture(scope="module")
def outlier_problem():
    """A linear whose input has a few large channels (the case AWQ is for)."""
    rng = np.random.default_rng(0)
    n_in, n_out = 128, 64
    gains = np.ones(n_in, np.float32)
    gains[rng.choice(n_in, 6, replace=False)] = 20.0
    x = rng.standard_normal((4096, n_in)).astype(np.float32) * gains
    w = (0.05 * rng.standard_normal((n_out, n_in))).astype(np.float32)
    h, n = accumulate_hessian(*empty_hessian(n_in), x)
    st = GroupStats(h=h, abs_mean=np.abs(x).sum(axis=0, dtype=np.float64) / n)
    return w, x, st


@pytest.mark.parametrize("scheme_name", ["q4_0", "int4_g64_asym"])
def test_scale_search_beats_rtn(outlier_problem, scheme_name):
    w, x, st = outlier_problem
    scheme = get_scheme(scheme_name)
    s, alpha, loss, loss0 = search_scale([w], [scheme], st)
    assert alpha > 0 and loss < 0.9 * loss0
    w_hat = rtn_dequant(w * s, scheme) / s
    rtn = rtn_dequant(w, scheme)
    assert np.linalg.norm(x @ (w - w_hat).T) < np.linalg.norm(x @ (w - rtn).T)
    np.testing.assert_allclose(output_error(w, w_hat, st.h), loss, rtol=1e-4)


@pytest.mark.parametrize("scheme_name", ["q4_0", "q4_k", "int4_g64_asym", "fp8_e4m3fn_pt"])
def test_scale_search_scores_every_candidate_as_its_definition_says(outlier_problem, scheme_name, monkeypatch):
    """The stacked search (several candidates per product; FP8's per-tensor grid one at a time) gives each
    candidate the loss of the plain recipe — s = mean|x|^α normalised, RTN of W·s, divided back, output error
    on H — and keeps the least (the first on ties)."""
    import qkiln.quantize.awq as awq

    w, _, st = outlier_problem
    w = np.concatenate([w, w[:, :128]], axis=1)[:, :256] if scheme_name == "q4_k" else w  # K-quants: 256 columns
    st = st if w.shape[1] == st.h.shape[0] else GroupStats(h=np.kron(np.eye(2), st.h),
                                                          abs_mean=np.tile(st.abs_mean, 2))
    scheme = get_scheme(scheme_name)
    monkeypatch.setattr(awq, "SEARCH_FLOATS", 3 * w.size)  # chunks of 3 candidates: a partial last chunk too
    n_grid = 10
    want = []
    for alpha in np.arange(n_grid) / n_grid:
        s = np.power(np.maximum(st.abs_mean, 1e-8), alpha)
        s = np.maximum(s / np.sqrt(s.max() * s.min()), 1e-4).astype(np.float32)
        want.append(output_error(w, rtn_dequant(w * s, scheme) / s, st.h))
    s, alpha, loss, loss0 = search_scale([w, None], [scheme, None], st, n_grid=n_grid, coarse=1)  # None: float
    best = int(np.argmin(want))
    assert alpha == best / n_grid
    np.testing.assert_allclose([loss, loss0], [want[best], want[0]], rtol=1e-4)
    cands, h32 = awq.candidate_scales(st.abs_mean, n_grid)[1], st.h.astype(np.float32)
    factor = awq.error_factor(st.h)
    assert factor is not None
    monkeypatch.setattr(awq, "FACTOR_BLOCK", 48)  # blocks that do not divide the columns: a partial last one
    for f in (factor, None):  # block-triangular through the Cholesky factor, and dense
        np.testing.assert_allclose(awq.candidate_losses(w, scheme, cands, h32, f), want, rtol=1e-4)


@pytest.mark.parametrize("minimum", range(20))
def test_coarse_to_fine_search_finds_the_grid_minimum_of_a_unimodal_loss(minimum, monkeypatch):
    import qkiln.quantize.awq as awq

    evaluated: list[int] = []

    def fake_losses(w, scheme, s, h, factor=None):  # a V-shaped loss in alpha, read back from s = x**alpha
        idx = np.rint(np.log(s[:, 1] / s[:, 0]) / np.log(2.0) * 20).astype(int)  # x = (1, 2): ratio 2**alpha
        evaluated.extend(idx.tolist())
        return np.abs(idx - minimum).astype(np.float64) + 1.0

    monkeypatch.setattr(awq, "candidate_losses", fake_losses)
    st = GroupStats(h=np.eye(2), abs_mean=np.array([1.0, 2.0]))
    _, alpha, loss, loss0 = search_scale([np.ones((1, 2), np.float32)], [get_scheme("q4_0")], st)
    assert alpha == minimum / 20 and loss == 1.0 and loss0 == minimum + 1.0
    assert len(evaluated) == len(set(evaluated)) <= 9  # no candidate scored twice, under half the grid


def test_clip_search_never_worse_than_no_clip(outlier_problem):
    w, _, st = outlier_problem
    scheme = get_scheme("int4_g32")
    clipped = search_clip(w, scheme, st.h)
    assert np.abs(clipped).max() <= np.abs(w).max()
    assert output_error(w, rtn_dequant(clipped, scheme), st.h) <= output_error(w, rtn_dequant(w, scheme), st.h) * 1.001


def test_awq_layer_folds_and_reports(tiny_config, llama_weights):
    cfg = tiny_config()
    t = _layer_tensors(llama_weights(cfg), 0)
    rng = np.random.default_rng(1)
    stats = {}
    for g, names in INPUT_GROUPS.items():
        d = t[names[0]].shape[1]
        x = rng.standard_normal((512, d)).astype(np.float32) * np.exp(rng.standard_normal(d)).astype(np.float32)
        h, n = accumulate_hessian(*empty_hessian(d), x)
        stats[g] = GroupStats(h=h, abs_mean=np.abs(x).sum(axis=0, dtype=np.float64) / n)
    schemes = dict.fromkeys(LINEARS, get_scheme("int4_g32_asym"))
    schemes["self_attn.k_proj"] = None  # kept in float: no loss, no jobs
    res = awq_layer(t, stats, schemes, cfg, n_grid=10, clip=True)
    assert set(res.tensors) == set(t)
    for g in INPUT_GROUPS:
        assert res.info[g]["loss"] <= res.info[g]["loss_rtn"]
    # the pooled search (every group's jobs at once, largest first) is the one-group search, whatever the workers
    for threads in (1, 3):
        again = awq_layer(t, stats, schemes, cfg, n_grid=10, clip=True, threads=threads)
        assert again.info == res.info
        for n in t:
            np.testing.assert_array_equal(again.tensors[n], res.tensors[n])
    for g, names in INPUT_GROUPS.items():
        st = stats[g] if g != "attn_out" else GroupStats(h=stats[g].h, abs_mean=tie_heads(stats[g].abs_mean, cfg))
        _, alpha, loss, loss0 = search_scale([t[n] for n in names], [schemes[n] for n in names], st, n_grid=10)
        assert res.info[g] == {"alpha": alpha, "loss": loss, "loss_rtn": loss0}


def test_error_factor_of_a_singular_hessian_gives_the_dense_loss(outlier_problem):
    """A channel that is never active (a zero row and column of H) must not cost the factor its use."""
    import qkiln.quantize.awq as awq

    w, x, _ = outlier_problem
    x = x.copy()
    x[:, 3] = 0.0
    h, _ = accumulate_hessian(*empty_hessian(x.shape[1]), x)
    factor = awq.error_factor(h)
    assert factor is not None and np.allclose(np.tril(factor), factor)
    e = (0.01 * np.random.default_rng(2).standard_normal((3 * w.shape[0], w.shape[1]))).astype(np.float32)
    dense = awq._squared_norms(e, None, h.astype(np.float32), 3)
    np.testing.assert_allclose(awq._squared_norms(e, factor, h.astype(np.float32), 3), dense, rtol=1e-4)
    assert awq.error_factor(-np.eye(4)) is None  # not positive semidefinite: the dense product is used
