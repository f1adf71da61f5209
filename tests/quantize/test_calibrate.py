"""Layer-streamed calibration on a tiny model: runs, fits the grids, and lowers KL against RTN."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.errors import QuantizeError
from qkiln.model.source import DictSource
from qkiln.quantize.calibrate import QuantizeReport, awq_windows, calibration_ids, quantize_model
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.tensor import QuantizedTensor
from qkiln.runtime.llama import LlamaModel


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _kl(ref: np.ndarray, got: np.ndarray) -> float:
    lp, lq = _log_softmax(ref), _log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _model(tiny_config, llama_weights):
    """A tiny model with what makes calibration matter in real ones: correlated channels (low-rank
    embeddings) and a few outlier channels (large RMSNorm gains)."""
    cfg = tiny_config(intermediate_size=192)
    w = llama_weights(cfg, seed=5)
    rng = np.random.default_rng(1)
    low_rank = rng.standard_normal((cfg.vocab_size, 8)) @ rng.standard_normal((8, cfg.hidden_size)) / 3
    w["model.embed_tokens.weight"] = (low_rank + 0.3 * rng.standard_normal(low_rank.shape)).astype(np.float32)
    for i in range(cfg.num_hidden_layers):
        for n in ("input_layernorm", "post_attention_layernorm"):
            g = w[f"model.layers.{i}.{n}.weight"].copy()
            g[rng.choice(cfg.hidden_size, 4, replace=False)] *= 8
            w[f"model.layers.{i}.{n}.weight"] = g
    return cfg, w


def _run(cfg, weights, algo, scheme_name, ids, **kw):
    report = QuantizeReport(algo=algo)
    scheme, q8 = get_scheme(scheme_name), get_scheme("q8_0")

    def choose(name, shape):  # embeddings/head at Q8_0 so the linears' quantization is what KL sees
        return q8 if "embed" in name or "lm_head" in name else scheme

    out = dict(quantize_model(DictSource(cfg, weights), choose, algo, ids, report=report, **kw))
    dense = {n: v.dequantize() if isinstance(v, QuantizedTensor) else v for n, v in out.items()}
    return out, dense, report


@pytest.mark.parametrize("scheme_name", ["q4_0", "int4_g32_asym"])
def test_gptq_and_awq_beat_rtn_on_kl(tiny_config, llama_weights, scheme_name):
    cfg, weights = _model(tiny_config, llama_weights)
    rng = np.random.default_rng(0)
    calib = calibration_ids(rng.integers(3, cfg.vocab_size, size=16 * 64), 16, 64)
    evals = rng.integers(3, cfg.vocab_size, size=(4, 64))
    ref = LlamaModel(DictSource(cfg, weights)).forward(evals)
    kl = {}
    for algo in ("rtn", "gptq", "awq", "awq+gptq"):
        out, dense, report = _run(cfg, weights, algo, scheme_name, calib, batch_samples=5)
        assert set(dense) == set(weights)
        for name, v in out.items():
            if isinstance(v, QuantizedTensor):  # every quantized tensor is exactly on its grid
                np.testing.assert_array_equal(v.scheme.encode(v.dequantize(), v.params), v.codes, err_msg=name)
        assert len(report.layer_seconds) == cfg.num_hidden_layers and report.peak_rss_bytes > 0
        kl[algo] = _kl(ref, LlamaModel(DictSource(cfg, dense)).forward(evals))
    assert kl["gptq"] < 0.6 * kl["rtn"], kl
    assert kl["awq"] < 0.9 * kl["rtn"], kl
    assert kl["awq+gptq"] < 0.6 * kl["rtn"], kl


def test_awq_statistics_come_from_the_chosen_windows_only(tiny_config, llama_weights):
    """awq_samples=4 of 16 windows: the same scales (so, with RTN after them, the same tensors) as AWQ given
    only those 4 windows — and not those of all 16."""
    assert awq_windows(16, None) is None and awq_windows(16, 16) is None
    np.testing.assert_array_equal(awq_windows(16, 4), [0, 5, 10, 15])
    assert len(awq_windows(36, 16)) == 16
    with pytest.raises(QuantizeError, match="at least one"):
        awq_windows(16, 0)
    cfg, weights = _model(tiny_config, llama_weights)
    calib = calibration_ids(np.random.default_rng(0).integers(3, cfg.vocab_size, size=16 * 32), 16, 32)
    runs = {}
    for key, ids, awq_samples in (("sub", calib, 4), ("only", calib[[0, 5, 10, 15]], None), ("all", calib, None)):
        out, _, report = _run(cfg, weights, "awq", "q4_0", ids, batch_samples=3, awq_samples=awq_samples)
        assert report.settings["awq_samples"] == awq_samples
        runs[key] = out
    name = "model.layers.1.mlp.down_proj.weight"
    for n, v in runs["sub"].items():
        got, want = (v.codes, runs["only"][n].codes) if isinstance(v, QuantizedTensor) else (v, runs["only"][n])
        np.testing.assert_array_equal(got, want, err_msg=n)
    assert not np.array_equal(runs["sub"][name].codes, runs["all"][name].codes)


def test_rtn_needs_no_calibration_and_bad_shapes_fail_first(tiny_config, llama_weights):
    cfg, weights = _model(tiny_config, llama_weights)
    out = dict(quantize_model(DictSource(cfg, weights), get_scheme("q8_0"), "rtn", None))
    assert isinstance(out["model.layers.1.mlp.down_proj.weight"], QuantizedTensor)
    assert out["model.norm.weight"].dtype == np.float32
    with pytest.raises(QuantizeError, match="not a multiple"):  # hidden 64 is not a multiple of 128
        next(iter(quantize_model(DictSource(cfg, weights), get_scheme("int4_g128"), "gptq", np.zeros((1, 8), np.int64))))
    with pytest.raises(QuantizeError, match="needs calibration"):
        next(iter(quantize_model(DictSource(cfg, weights), get_scheme("q8_0"), "gptq", None)))


def test_calibration_windows():
    ids = np.arange(1000)
    got = calibration_ids(ids, 3, 300)
    assert got.shape == (3, 300) and got[1, 0] == 300
    assert calibration_ids(ids, 10, 300).shape == (3, 300)  # as many full windows as the text holds
    with pytest.raises(QuantizeError, match="1000 tokens, one sample needs 2048"):
        calibration_ids(ids, 1, 2048)


def test_rules_fall_back_per_tensor_and_keep_float(tiny_config, llama_weights):
    from qkiln.quantize.rules import Rule, RuleSet

    cfg, weights = _model(tiny_config, llama_weights)
    rules = RuleSet((Rule("*.mlp.down_proj.weight", "keep"),), "q4_k")  # rows of 64/192: Q4_K needs 256
    calib = calibration_ids(np.arange(3, 3 + 4 * 32) % cfg.vocab_size, 4, 32)
    report = QuantizeReport(algo="awq+gptq")
    out = dict(quantize_model(DictSource(cfg, weights), rules, "awq+gptq", calib, report=report))
    assert report.schemes["model.layers.0.self_attn.q_proj.weight"] == "q5_0"
    assert "not a multiple" in report.fallbacks["model.layers.0.self_attn.q_proj.weight"]
    assert report.schemes["model.layers.1.mlp.down_proj.weight"] == "keep"
    down = out["model.layers.1.mlp.down_proj.weight"]
    assert isinstance(down, np.ndarray) and down.dtype == np.float32  # kept in float (AWQ-folded)
    assert isinstance(out["model.layers.1.mlp.up_proj.weight"], QuantizedTensor)


@pytest.mark.parametrize("tied", [True, False])
def test_gptq_of_the_head_lowers_its_output_error(tiny_config, llama_weights, tied):
    """With a GPTQ algorithm the head (lm_head, or the tied table that is also the embedding) is quantized by
    GPTQ on its input's Hessian: the head's output error on the calibration tokens' final-normed states,
    ||X (W - Q)ᵀ||, is well below the RTN head's on the same grid (what GPTQ minimizes; the demo model's KL
    gain is in the README). Linears at Q8_0."""
    from qkiln.kernels import elementwise as ew

    cfg, weights = _model(lambda **kw: tiny_config(tie_word_embeddings=tied, **kw), llama_weights)
    weights.pop("lm_head.weight", None)
    if not tied:  # an untied head with the table's structure (correlated rows)
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].copy()
    name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    rng = np.random.default_rng(0)
    calib = calibration_ids(rng.integers(3, cfg.vocab_size, size=16 * 64), 16, 64)
    h = LlamaModel(DictSource(cfg, weights)).hidden(calib)
    x = ew.rms_norm(h.reshape(-1, cfg.hidden_size), weights["model.norm.weight"], cfg.rms_norm_eps)
    head, q8 = get_scheme("int4_g32"), get_scheme("q8_0")

    def choose(n, shape):
        return head if n == name else q8

    err = {}
    for gptq_head in (False, True):
        report = QuantizeReport(algo="gptq")
        out = dict(quantize_model(DictSource(cfg, weights), choose, "gptq", calib, gptq_head=gptq_head, report=report))
        assert report.settings["gptq_head"] is gptq_head and set(out) == set(weights)
        q = out[name]
        assert isinstance(q, QuantizedTensor) and q.scheme == head
        np.testing.assert_array_equal(q.scheme.encode(q.dequantize(), q.params), q.codes)
        err[gptq_head] = float(np.linalg.norm(x @ (weights[name] - q.dequantize()).T))
    assert err[True] < 0.8 * err[False], err
