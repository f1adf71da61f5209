"""Packed weights in qkiln's runtime and `qkiln bench`: a GGUF runs on its own blocks and gives the logits of
the dense dequantized model (up to the int8 activation rounding llama.cpp also does)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qkiln.formats.gguf_model import GGUFSource, load_gguf_model
from qkiln.kernels import api
from qkiln.kernels.linear import FusedMember, PackedLinear
from qkiln.kernels.types import WType
from qkiln.validate.metrics import TokenScores

MIXED = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q8_0", "attn_output": "Q4_K", "ffn_gate": "Q4_0",
         "ffn_up": "Q6_K", "ffn_down": "Q4_K", "token_embd": "Q8_0", "output": "Q4_0"}
LEGACY = {**MIXED, "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_output": "Q4_1", "ffn_up": "Q5_1", "output": "Q5_0"}
KQUANTS = {**MIXED, "attn_q": "Q2_K", "attn_k": "Q3_K", "attn_v": "Q5_K", "attn_output": "Q3_K", "ffn_gate": "Q2_K",
           "ffn_up": "Q5_K", "ffn_down": "Q3_K", "output": "Q2_K"}


def test_packed_linear_is_the_dequantized_product():
    gguf = pytest.importorskip("gguf", reason="gguf-py quantizes the reference weights")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for t in (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0):
        blocks = gguf.quants.quantize(w, t)
        op = PackedLinear(WType(int(t)), blocks, 48, 256)
        act = api.quantize_activations_q8(x)
        xq = (act.qs.reshape(3, -1, 32) * act.d[..., None]).reshape(3, 256)
        np.testing.assert_allclose(op(x), xq @ gguf.quants.dequantize(blocks, t).T, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="needs"):
        PackedLinear(WType.Q4_0, blocks[:10], 48, 256)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("types", [MIXED, LEGACY, KQUANTS], ids=["mixed", "q5_0-q4_1-q5_1", "q2_k-q3_k-q5_k"])
@pytest.mark.parametrize("tied", [False, True])
def test_gguf_model_on_packed_weights_matches_dense(make_gguf, tied, types):
    path = make_gguf(types=types, tied=tied, hidden=256, intermediate=512)
    lm = load_gguf_model(path)
    assert len(lm.model._ops) == 2 * 7 + 1  # every linear and the head run packed
    from qkiln.runtime.llama import LlamaModel

    dense = LlamaModel(GGUFSource(lm.model.source._f, lm.model.config))
    ids = np.arange(3, 40, dtype=np.int64)[None]
    got, want = lm.model.forward(ids)[0], dense.forward(ids)[0]
    # q/k rows must be unpermuted exactly like the dense import, or attention would be scrambled
    kl = (_softmax(want) * (np.log(_softmax(want)) - np.log(_softmax(got)))).sum(-1).mean()
    assert kl < 2e-3, kl
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # int8 activation rounding over 2 layers
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.8  # random model: near-ties


def test_bench_cli_json_and_errors(make_gguf, tmp_path):
    from qkiln.cli.main import app

    types = {**MIXED, "attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q2_K", "ffn_gate": "Q5_1", "ffn_up": "Q4_1",
             "ffn_down": "Q3_K", "output": "Q5_K"}
    path = make_gguf(types=types, hidden=256, intermediate=512)
    r = CliRunner().invoke(app, ["bench", str(path), "--json", "--seconds", "0", "--prompt-tokens", "4",
                                 "--threads", "2", "--price-per-hour", "1.5"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kernel_path"] == api.kernel_path()
    assert doc["types"] == ["Q2_K", "Q3_K", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K"]  # each timed as itself
    assert "stand_ins" not in doc
    assert doc["decode_tokens_per_s"] > 0 and doc["prompt_tokens_per_s"] > 0 and doc["machine_copy_gbs"] > 0
    assert doc["usd_per_million_decode_tokens"] == pytest.approx(1.5 / 3600 / doc["decode_tokens_per_s"] * 1e6, rel=1e-2)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    r = CliRunner().invoke(app, ["bench", str(bad)])
    assert r.exit_code == 2 and "not a readable GGUF" in r.output
    r = CliRunner().invoke(app, ["bench", str(tmp_path / "missing.gguf")])
    assert r.exit_code == 2 and "not found" in r.output


@pytest.mark.parametrize("kind", ["F16", "BF16"])
def test_bench_refuses_a_type_without_a_kernel(make_gguf, kind):
    """A weight type with no kernel is an error (exit 2) that names it, never timed as another type."""
    from qkiln.cli.main import app

    path = make_gguf(types={**MIXED, "ffn_up": kind}, hidden=256, intermediate=512)
    r = CliRunner().invoke(app, ["bench", str(path), "--seconds", "0", "--prompt-tokens", "4"])
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert f"no kernel for {kind} (2 tensors, e.g. blk.0.ffn_up.weight)" in text
    assert "Traceback" not in r.output


@pytest.mark.parametrize("scheme", ["q4_0", "q8_0", "q4_k", "q6_k", "q5_0", "q4_1", "q5_1", "q2_k", "q3_k", "q5_k",
                                    "int4_g128",
                                    "int4_g32_asym", "int4_g64_asym", "int4_pc", "int8"])
def test_quantized_tensor_plugs_as_packed_linear(scheme):
    """A QuantizedTensor from qkiln's quantizers runs on its ggml blocks and equals its dequantized product."""
    from qkiln.quantize.packed import packed_linear_from_quantized
    from qkiln.quantize.registry import get_scheme
    from qkiln.quantize.rtn import quantize_rtn

    rng = np.random.default_rng(3)
    w = rng.standard_normal((40, 512)).astype(np.float32)
    qt = quantize_rtn(w, get_scheme(scheme))
    op = packed_linear_from_quantized(qt)
    if scheme == "int8":
        assert op is None  # no kernel: stays dense
        return
    if scheme in ("q5_0", "q4_1", "q5_1", "q2_k", "q3_k", "q5_k"):
        assert op.wtype == WType[scheme.upper()]
    if scheme.startswith("int4"):
        assert op.wtype == (WType.INT4GX8 if api.kernel_path() == "avx512" else WType.INT4G)
    x = rng.standard_normal((2, 512)).astype(np.float32)
    act = api.quantize_activations_q8(x)
    xq = (act.qs.reshape(2, -1, 32) * act.d[..., None]).reshape(2, 512)
    want = xq @ qt.dequantize().T
    np.testing.assert_allclose(op(x), want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))


def _scores_against_llama_cpp(path: Path) -> TokenScores:
    """qkiln's runtime on a GGUF's packed blocks against llama.cpp on the same file: 256 tokens of real text
    (a 20-token prompt makes top-1 agreement a coin toss on a handful of positions)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference runtime")
    from qkiln.validate.decode_compare import PROMPT

    lm = load_gguf_model(path)
    ids = lm.encode(Path("/usr/share/common-licenses/Apache-2.0").read_text())[:256]
    ours = lm.model.forward(ids[None])[0]  # (s, vocab)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=2, logits_all=True, verbose=False)
    assert list(llm.tokenize(PROMPT.encode(), add_bos=False, special=False)) == lm.encode(PROMPT).tolist()
    llm.eval(ids.tolist())
    theirs = np.array(llm.scores[: ids.size], dtype=np.float32)
    scores = TokenScores()
    scores.add_window(ids, ours, ref_logits=theirs)
    return scores


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_q4_0_on_packed_weights_agrees_with_llama_cpp():
    """The demo model's Q4_0 GGUF (llama.cpp's quantizer) through qkiln's runtime on its packed blocks gives
    llama.cpp's next-token distribution: both quantize activations to int8 per 32, so they nearly coincide."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is the reference runtime")
    from qkiln.validate.decode_compare import demo_q4_0_gguf

    scores = _scores_against_llama_cpp(demo_q4_0_gguf())
    assert scores.mean_kl < 0.02, scores.as_dict()  # measured 0.0057 (AVX-512 path)
    assert scores.top1_agreement >= 0.9, scores.as_dict()  # measured 0.957


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize(("ftype", "pure", "kind"), [("Q2_K", True, "Q2_K"), ("Q3_K_M", True, "Q3_K"),
                                                     ("Q5_K_M", False, "Q5_K")], ids=["q2_k", "q3_k", "q5_k_m"])
def test_demo_k_quants_on_packed_weights_agree_with_llama_cpp(tmp_path, ftype, pure, kind):
    """llama.cpp's own K-quant files of the demo model (`pure`: every tensor of the type where its rows allow,
    so Q2_K and Q3_K tensors exist; its mixes put none on these shapes) run packed in qkiln's C kernels with
    llama.cpp's next-token distribution. llama.cpp quantizes these types' activations per 256 (Q8_K), qkiln
    per 32, so they differ a little more than Q4_0 does; a misread block layout would differ by nats."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python quantizes the reference files")
    from qkiln.demo import demo_gguf_path
    from qkiln.formats.gguf_read import read_gguf

    path = tmp_path / f"demo-{ftype.lower()}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize, params.pure = True, pure
    assert llama_cpp.llama_model_quantize(str(demo_gguf_path()).encode(), str(path).encode(), ctypes.byref(params)) == 0
    assert kind in {t.ggml_type.name for t in read_gguf(path).tensors.values()}
    lm = load_gguf_model(path)
    assert all(isinstance(lm.model.linear_op(f"model.layers.0.{n}"), PackedLinear | FusedMember)
               for n in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"))  # nothing dense
    scores = _scores_against_llama_cpp(path)
    assert scores.mean_kl < 0.04, scores.as_dict()  # measured 0.019 / 0.011 / 0.011 (AVX-512 path)
    assert scores.top1_agreement >= 0.85, scores.as_dict()  # measured 0.91 / 0.95 / 0.94


def test_fused_members_equal_separate_products_in_any_order():
    from qkiln.kernels.linear import FusedPacked

    rng = np.random.default_rng(4)
    ops = []
    for i, n in enumerate((64, 32, 32)):
        w = rng.integers(0, 256, n * 8 * 18, dtype=np.uint8)
        w.reshape(-1, 18)[:, :2] = np.array([0.01 * (i + 1)], np.float16).view(np.uint8)
        ops.append((f"m{i}", PackedLinear(WType.Q4_0, w, n, 256)))
    fused = FusedPacked(ops)
    x1, x2 = (rng.standard_normal((3, 256)).astype(np.float32) for _ in range(2))
    members = [fused.member(i) for i in range(3)]
    for order in ((0, 1, 2), (2, 0, 1)):
        for i in order:
            np.testing.assert_array_equal(members[i](x1), ops[i][1](x1))
    np.testing.assert_array_equal(members[1](x1), ops[1][1](x1))
    np.testing.assert_array_equal(members[2](x2), ops[2][1](x2))  # a new input recomputes
    np.testing.assert_array_equal(members[0](x2), ops[0][1](x2))
