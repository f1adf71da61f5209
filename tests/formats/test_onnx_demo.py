"""The demo model (SmolLM2-135M-Instruct, tied embeddings, 9 heads / 3 KV heads) through `convert --to onnx`:
onnxruntime's logits equal qkiln's runtime on the same dequantized weights, prompt and KV-cache steps
(tolerance 5e-5 × max |logit| at accuracy_level 0, 30 layers deep), and onnxruntime-genai generates from the folder."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.quantize.tensor import QuantizedTensor

pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (test extra)")
pytestmark = [pytest.mark.slow, pytest.mark.onnx]


def test_demo_model_int4_g32(tmp_path):
    from qkiln.demo import demo_model_dir
    from qkiln.formats.hf import Checkpoint
    from qkiln.formats.onnx_run import OnnxLlama
    from qkiln.model.source import DictSource
    from qkiln.pipeline.onnx import convert_to_onnx, onnx_schemes
    from qkiln.pipeline.stream import layer_ordered, weight_stream
    from qkiln.runtime.llama import LlamaModel

    src = demo_model_dir()
    out = tmp_path / "demo"
    convert_to_onnx(src, out, "int4_g32", accuracy_level=0)

    # The same RTN codes again (deterministic), dequantized: the tied table is the head's codes in both.
    ckpt = Checkpoint.open(src)
    schemes, _ = onnx_schemes(ckpt, "int4_g32", strict=False)
    dense = {n: (w.dequantize() if isinstance(w, QuantizedTensor) else w)
             for n, w in layer_ordered(weight_stream(ckpt, schemes, "rtn", [], samples=1, seq_len=1), ckpt.config)}
    ref = LlamaModel(DictSource(ckpt.config, dense))

    ids = np.asarray(ckpt.tokenizer().encode("The GNU General Public License is a free, copyleft license for").ids)[None]
    model = OnnxLlama(out)
    want = ref.forward(ids)
    tol = 5e-5 * np.abs(want).max()  # 30 layers of float32 in two summation orders (measured 1.0e-5)
    assert np.abs(model.forward(ids) - want).max() <= tol
    s = ids.shape[1] - 4
    logits, past = model.step(ids[:, :s])
    worst = np.abs(logits - want[:, :s]).max()
    for t in range(s, ids.shape[1]):
        logits, past = model.step(ids[:, t:t + 1], past)
        worst = max(worst, np.abs(logits[:, 0] - want[:, t]).max())
    assert worst <= tol

    og = pytest.importorskip("onnxruntime_genai")
    m = og.Model(str(out))
    tok = og.Tokenizer(m)
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=48, do_sample=False)
    gen = og.Generator(m, params)
    gen.append_tokens(tok.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"))
    while not gen.is_done():
        gen.generate_next_token()
    text = tok.decode(gen.get_sequence(0))
    assert "Paris" in text, text
