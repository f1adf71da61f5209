"""ONNX writer: MatMulNBits packing is exact, onnx.checker (full) accepts the graph, onnxruntime's logits equal
qkiln's runtime on the same dequantized weights — whole prompt and token by token through the KV cache — and
onnxruntime-genai loads the folder and generates the runtime's greedy tokens.

Tolerance: with accuracy_level 0 (float32 activations) every logit is within 1e-5 × max(1, max |logit|) of
qkiln's NumPy runtime (measured ≤ 4e-7 relative: both are float32 with different summation orders).
With accuracy_level 4 (int8 activations, what ships) within 5e-2 × max |logit|, and top-1 mostly agrees.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkiln.errors import QuantizeError
from qkiln.formats.onnx_graph import GraphOptions
from qkiln.formats.onnx_pack import check_onnx_scheme, pack_nbits, unpack_nbits
from qkiln.model.source import DictSource
from qkiln.quantize.calibrate import quantize_model
from qkiln.quantize.int_grid import IntGrid, int_schemes
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.tensor import QuantizedTensor
from qkiln.runtime.llama import LlamaModel

ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (test extra)")
pytestmark = pytest.mark.onnx

INT_SCHEMES = [s.name for s in int_schemes()]
REL_TOL = 1e-5


# ---- packing ------------------------------------------------------------------------------------

@given(name=st.sampled_from(INT_SCHEMES), rows=st.integers(1, 9), blocks=st.integers(1, 5),
       odd=st.sampled_from([0, 8, 24]), seed=st.integers(0, 2**16))
def test_pack_unpack_is_exact(name, rows, blocks, odd, seed):
    """Every int grid's codes and params land in MatMulNBits' layout and decode to exactly dequantize()."""
    scheme = get_scheme(name)
    cols = blocks * (scheme.group or 32) + (odd if not scheme.group else 0)  # per channel: K any width (padded)
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    qt = quantize_rtn(w, scheme, name="w")
    packed = pack_nbits(qt)
    assert packed.b.dtype == np.uint8 and packed.b.shape[:2] == packed.scales.shape
    np.testing.assert_array_equal(unpack_nbits(packed), qt.dequantize())


def test_nibble_order_is_low_first():
    """Weight k of a block in the low nibble when k is even (ORT's layout), zero points likewise."""
    scheme = get_scheme("int4_g32_asym")
    codes = np.tile(np.arange(32, dtype=np.uint8) % 16, (1, 2))  # (1, 64)
    qt = QuantizedTensor(scheme, codes, {"scale": np.ones((1, 2), np.float16), "zero": np.array([[3, 12]], np.uint8)})
    p = pack_nbits(qt)
    assert p.b[0, 0, 0] == 0x10 and p.b[0, 0, 1] == 0x32
    assert p.zeros is not None and p.zeros.tolist() == [[0xC3]]


@pytest.mark.parametrize("scheme, message", [
    (IntGrid("int4_g48", bits=4, group=48), "groups of 48 columns; MatMulNBits takes blocks of 16, 32, 64, 128, 256"),
    ("q4_k", "llama.cpp K-quant"),
    ("fp8_e4m3fn", "no FP8 matrix product"),
    ("q4_1", "no MatMulNBits layout"),
])
def test_grids_matmulnbits_cannot_hold_are_refused(scheme, message):
    with pytest.raises(QuantizeError, match=message):
        check_onnx_scheme(get_scheme(scheme) if isinstance(scheme, str) else scheme)


# ---- the graph against qkiln's runtime ----------------------------------------------------------

def build(tmp_path: Path, cfg, weights, scheme: str, *, algo: str = "rtn", calib=None, accuracy_level: int = 0,
          tokenizer_dir: Path | None = None, float_dtype: str = "fp32"):
    """Quantize, write the folder, and return (folder, runtime on the same dequantized weights)."""
    from qkiln.formats.onnx_write import write_onnx_folder

    src = DictSource(cfg, weights)
    items = list(quantize_model(src, get_scheme(scheme), algo, calib))
    dense = {n: (w.dequantize() if isinstance(w, QuantizedTensor) else w) for n, w in items}
    if tokenizer_dir is None:
        tokenizer_dir = tmp_path / "tok"
        tokenizer_dir.mkdir(exist_ok=True)
    out = tmp_path / f"onnx-{scheme}-{algo}-{accuracy_level}-{float_dtype}"
    write_onnx_folder(out, cfg, iter(items), tokenizer_dir,
                      options=GraphOptions(accuracy_level=accuracy_level, float_dtype=float_dtype))
    if float_dtype == "fp16":  # what the graph stores
        dense = {n: (v.astype(np.float16).astype(np.float32) if n == "model.embed_tokens.weight" or v.ndim == 1 else v)
                 for n, v in dense.items()}
    return out, LlamaModel(DictSource(cfg, dense))


def run_both(folder: Path, ref: LlamaModel, ids: np.ndarray, prompt: int) -> tuple[float, float, float]:
    """(max |diff| whole prompt, max |diff| prompt-then-steps, max |ref logit|)."""
    from qkiln.formats.onnx_run import OnnxLlama

    onnx_model = OnnxLlama(folder)
    want = ref.forward(ids)
    whole = float(np.abs(onnx_model.forward(ids) - want).max())
    logits, past = onnx_model.step(ids[:, :prompt])
    step = float(np.abs(logits - want[:, :prompt]).max())
    for t in range(prompt, ids.shape[1]):
        logits, past = onnx_model.step(ids[:, t:t + 1], past)
        step = max(step, float(np.abs(logits[:, 0] - want[:, t]).max()))
    return whole, step, float(np.abs(want).max())


@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g64_asym", "int4_pc", "int4_pc_asym", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_logits_equal_runtime_prompt_and_kv_cache(tmp_path, tiny_config, llama_weights, scheme, tied):
    import onnx

    cfg = tiny_config(tie_word_embeddings=tied)
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), scheme)
    onnx.checker.check_model(str(folder / "model.onnx"), full_check=True)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 11))
    whole, step, scale = run_both(folder, ref, ids, prompt=7)
    assert whole <= REL_TOL * max(1.0, scale), (whole, scale)
    assert step <= REL_TOL * max(1.0, scale), (step, scale)


@pytest.mark.parametrize("algo, scheme", [("gptq", "int4_g32"), ("awq+gptq", "int4_g32_asym"), ("awq", "int8")])
def test_calibrated_codes_are_packed_as_they_are(tmp_path, tiny_config, llama_weights, algo, scheme):
    cfg = tiny_config()
    calib = np.random.default_rng(2).integers(3, cfg.vocab_size, (4, 32))
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), scheme, algo=algo, calib=calib)
    ids = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9))
    whole, step, scale = run_both(folder, ref, ids, prompt=5)
    assert max(whole, step) <= REL_TOL * max(1.0, scale)


def test_llama3_rope_scaling_is_honoured(tmp_path, tiny_config, llama_weights):
    from qkiln.model.config import RopeScaling

    cfg = tiny_config(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 32), rope_theta=500000.0)
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), "int4_g32")
    ids = np.random.default_rng(4).integers(0, cfg.vocab_size, (1, 40))
    whole, step, scale = run_both(folder, ref, ids, prompt=30)
    assert max(whole, step) <= REL_TOL * max(1.0, scale)


def test_fp16_float_tensors(tmp_path, tiny_config, llama_weights):
    cfg = tiny_config()
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), "int4_g32", float_dtype="fp16")
    ids = np.random.default_rng(5).integers(0, cfg.vocab_size, (1, 8))
    whole, step, scale = run_both(folder, ref, ids, prompt=4)
    assert max(whole, step) <= REL_TOL * max(1.0, scale)


def test_accuracy_level_4_int8_activations(tmp_path, tiny_config, llama_weights):
    """What ships: activations quantized to int8 by MatMulNBits — close, not equal."""
    from qkiln.formats.onnx_run import OnnxLlama

    cfg = tiny_config()
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), "int4_g32", accuracy_level=4)
    ids = np.random.default_rng(6).integers(0, cfg.vocab_size, (1, 32))
    got, want = OnnxLlama(folder).forward(ids), ref.forward(ids)
    assert np.abs(got - want).max() <= 5e-2 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


# ---- onnxruntime-genai -------------------------------------------------------------------------

def test_onnxruntime_genai_generates_the_runtime_greedy_tokens(tmp_path, tiny_config, llama_weights, tokenizer_files):
    og = pytest.importorskip("onnxruntime_genai", reason="needs onnxruntime-genai (test extra)")
    from qkiln.runtime.generate import generate_greedy

    cfg = tiny_config(tie_word_embeddings=True)
    tok = tmp_path / "tok"
    tok.mkdir()
    for fname, text in tokenizer_files(cfg.vocab_size).items():
        (tok / fname).write_text(text)
    folder, ref = build(tmp_path, cfg, llama_weights(cfg), "int4_g32", tokenizer_dir=tok)
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    import tokenizers

    text = "the model weight layer quantize token"
    prompt = list(tokenizer.encode(text))
    assert prompt == tokenizers.Tokenizer.from_file(str(tok / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    got = [int(t) for t in gen.get_sequence(0)][len(prompt):]
    want = generate_greedy(ref, prompt, 12)
    assert got == want[: len(got)] and len(got) >= 1
    # per-position logits of the prompt through genai equal the runtime's
    gen2 = og.Generator(model, params)
    gen2.append_tokens(prompt)
    logits = np.asarray(gen2.get_output("logits"))
    want_logits = ref.forward(np.array([prompt]))
    assert np.abs(logits.reshape(want_logits.shape) - want_logits).max() <= REL_TOL * max(1.0, np.abs(want_logits).max())


# ---- folder: atomic, deterministic --------------------------------------------------------------

def test_identical_inputs_give_identical_bytes(tmp_path, tiny_config, llama_weights):
    cfg = tiny_config()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, _ = build(tmp_path / "a", cfg, llama_weights(cfg), "int4_g64_asym")
    b, _ = build(tmp_path / "b", cfg, llama_weights(cfg), "int4_g64_asym")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "qkiln.json"} <= set(names)
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_failure_mid_write_leaves_nothing(tmp_path, tiny_config, llama_weights):
    from qkiln.formats.onnx_write import write_onnx_folder

    cfg = tiny_config()
    items = list(quantize_model(DictSource(cfg, llama_weights(cfg)), get_scheme("int4_g32"), "rtn", None))

    def broken():
        yield from items[:5]
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_onnx_folder(tmp_path / "out", cfg, broken(), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == []


def test_config_roundtrips_through_the_manifest(tmp_path, tiny_config, llama_weights):
    from qkiln.formats.onnx_run import _config_of

    cfg = dataclasses.replace(tiny_config(), bos_token_id=1)
    folder, _ = build(tmp_path, cfg, llama_weights(cfg), "int8")
    assert _config_of(folder) == cfg
