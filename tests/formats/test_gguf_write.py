"""GGUF writer: exact packing (gguf-py reads back qkiln's dequantize()), metadata, tokenizer, determinism.

`make_tiny_checkpoint` builds a seeded Llama whose widths are multiples of 256, so every K-quant is
exercised without falling back, with a real byte-level BPE tokenizer trained on a license text.
The llama.cpp tests (test_gguf_write_llamacpp.py) reuse it.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from qkiln.errors import GGUFError
from qkiln.formats.gguf_meta import Provenance, rope_freq_factors
from qkiln.formats.gguf_write import float_roundtrip, write_llama_gguf
from qkiln.formats.hf_write import write_checkpoint
from qkiln.formats.tokenizer_to_gguf import pre_tokenizer_name, tokenizer_from_folder
from qkiln.model import names as llama_names
from qkiln.model.config import LlamaConfig

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def train_tokenizer(vocab_size: int, text: str):
    """A SmolLM-style tokenizer (Digits + ByteLevel, 3 control tokens) trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def make_tiny_checkpoint(
    dest: Path,
    *,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    seed: int = 0,
    tie: bool = True,
    llama3_rope: bool = False,
) -> Path:
    """A seeded random Llama checkpoint folder with a trained tokenizer (vocab padded to `vocab`)."""
    text = Path("/usr/share/common-licenses/GPL-3").read_text()[:60000]
    tok = train_tokenizer(vocab - 4, text)  # 4 ids left unused: the writer pads them
    cfg: dict = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": tie,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if llama3_rope:
        cfg["rope_scaling"] = {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    config = LlamaConfig.from_dict(cfg)
    rng = np.random.default_rng(seed)
    hd = config.head_dim

    def lin(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "model.norm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
    }
    if not tie:
        tensors["lm_head.weight"] = lin(vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
            p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32),
            p + "self_attn.q_proj.weight": lin(heads * hd, hidden),
            p + "self_attn.k_proj.weight": lin(kv_heads * hd, hidden),
            p + "self_attn.v_proj.weight": lin(kv_heads * hd, hidden),
            p + "self_attn.o_proj.weight": lin(hidden, heads * hd),
            p + "mlp.gate_proj.weight": lin(intermediate, hidden),
            p + "mlp.up_proj.weight": lin(intermediate, hidden),
            p + "mlp.down_proj.weight": lin(hidden, intermediate),
        }
    tok_cfg = {"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "add_bos_token": False, "chat_template": CHAT_TEMPLATE}
    write_checkpoint(
        dest, config, tensors.items(),
        extra_files={"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(tok_cfg)},
    )
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", tie=False, llama3_rope=True)


def load(folder: Path):
    from qkiln.formats.hf import Checkpoint

    ckpt = Checkpoint.open(folder)
    weights = {n: np.array(ckpt.tensor(n)) for n in ckpt.names()}
    return ckpt.config, weights, tokenizer_from_folder(folder, ckpt.config.vocab_size)


def read_back(path: Path, config: LlamaConfig) -> dict[str, np.ndarray]:
    """gguf-py's reader + dequantizer, q/k un-permuted, HF names."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        if t.name in llama_names.GGUF_DERIVED:
            out[t.name] = np.array(t.data)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape))
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        hf = llama_names.gguf_to_hf_name(t.name, config.num_hidden_layers)
        if llama_names.is_q_proj(hf):
            w = llama_names.unpermute_qk(w, config.num_attention_heads)
        elif llama_names.is_k_proj(hf):
            w = llama_names.unpermute_qk(w, config.num_attention_heads, config.num_key_value_heads)
        out[hf] = w
    return out


PROV = Provenance(name="tiny", scheme="test", algorithm="rtn")


@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16"])
def test_float_types_read_back_exactly(tiny, tmp_path, ftype):
    config, weights, tok = load(tiny)
    out = tmp_path / "m.gguf"
    write_llama_gguf(out, config, weights, tok, PROV, float_type=ftype)
    back = read_back(out, config)
    ttype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[ftype]
    for name, w in weights.items():
        want = w if w.ndim == 1 else float_roundtrip(w, ttype)
        np.testing.assert_array_equal(back[name], want, err_msg=name)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_norm.weight"] == T.F32  # 1-D stays F32
    assert types["blk.0.attn_q.weight"] == ttype
    np.testing.assert_array_equal(back["rope_freqs.weight"], rope_freq_factors(config))


QTYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("scheme_name", QTYPES)
def test_quantized_codes_are_packed_exactly(tiny, tmp_path, scheme_name):
    """gguf.quants.dequantize of every written tensor == QuantizedTensor.dequantize() (after un-permuting)."""
    from qkiln.quantize.registry import get_scheme
    from qkiln.quantize.rtn import quantize_rtn

    if scheme_name.endswith("_k"):
        pytest.importorskip("qkiln.quantize.kquants", reason="K-quant grids not available")
    config, weights, tok = load(tiny)
    scheme = get_scheme(scheme_name)
    qweights = {n: quantize_rtn(w, scheme, name=n) if w.ndim == 2 else w for n, w in weights.items()}
    out = tmp_path / "m.gguf"
    plans = write_llama_gguf(out, config, qweights, tok, Provenance(name="tiny", scheme=scheme_name, algorithm="rtn"))
    assert {p.ggml_type.name.lower() for p in plans if len(p.shape) == 2} == {scheme_name}
    back = read_back(out, config)
    for name, w in qweights.items():
        want = w if isinstance(w, np.ndarray) else w.dequantize()
        np.testing.assert_array_equal(back[name], want, err_msg=name)


def test_metadata_keys_llama_cpp_needs(tiny, tmp_path):
    config, weights, tok = load(tiny)
    out = tmp_path / "m.gguf"
    prov = Provenance(name="tiny", scheme="f16", algorithm="none", calibration_sha256="ab" * 32, fallbacks=("x: a -> b",))
    write_llama_gguf(out, config, weights, tok, prov, float_type="f16")
    r = gguf.GGUFReader(out)
    meta = {k: f.contents() for k, f in r.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2
    assert meta["llama.embedding_length"] == 256
    assert meta["llama.feed_forward_length"] == 512
    assert meta["llama.attention.head_count"] == 4
    assert meta["llama.attention.head_count_kv"] == 2
    assert meta["llama.rope.dimension_count"] == 64
    assert meta["llama.vocab_size"] == 512
    assert meta["llama.context_length"] == 1024
    assert meta["general.file_type"] == 1
    assert r.fields["llama.block_count"].types == [gguf.GGUFValueType.UINT32]
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 512
    assert meta["tokenizer.ggml.tokens"][:3] == SPECIALS
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]
    assert meta["tokenizer.ggml.token_type"][-1] == 5 and meta["tokenizer.ggml.tokens"][-1] == "[PAD511]"
    assert meta["tokenizer.ggml.bos_token_id"] == 1 and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["qkiln.calibration.sha256"] == "ab" * 32
    assert meta["qkiln.fallbacks"] == ["x: a -> b"]
    assert "output.weight" in {t.name for t in r.tensors}  # untied


def test_same_inputs_same_bytes(tiny, tmp_path):
    config, weights, tok = load(tiny)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_llama_gguf(a, config, weights, tok, PROV, float_type="f16")
    write_llama_gguf(b, config, dict(reversed(list(weights.items()))), tok, PROV, float_type="f16")
    assert a.read_bytes() == b.read_bytes()


def test_tied_embeddings_write_no_output(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "tied", hidden=64, intermediate=128, heads=2, kv_heads=1, vocab=300)
    config, weights, tok = load(folder)
    out = tmp_path / "m.gguf"
    write_llama_gguf(out, config, weights, tok, PROV)
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names and "rope_freqs.weight" not in names


def test_missing_tensor_is_refused(tiny, tmp_path):
    config, weights, tok = load(tiny)
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(GGUFError, match=r"lacks model.layers.1.mlp.up_proj.weight"):
        write_llama_gguf(tmp_path / "m.gguf", config, weights, tok, PROV)
    assert not list(tmp_path.iterdir())  # nothing left behind


# -- tokenizer mapping -------------------------------------------------------------------------------------


def _pre(*steps):
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}


BYTELEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def test_pre_tokenizer_names():
    assert pre_tokenizer_name(_pre({"type": "Digits", "individual_digits": True}, BYTELEVEL)) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": BYTELEVEL}) == "gpt-2"
    from qkiln.formats.tokenizer_to_gguf import _LLAMA3_SPLIT

    split = {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False}
    assert pre_tokenizer_name(_pre(split, {**BYTELEVEL, "use_regex": False})) == "llama-bpe"


@pytest.mark.parametrize(
    "doc",
    [
        _pre({"type": "Whitespace"}),
        _pre({"type": "Digits", "individual_digits": False}, BYTELEVEL),
        {"pre_tokenizer": {**BYTELEVEL, "add_prefix_space": True}},
        {"normalizer": {"type": "NFKC"}, "pre_tokenizer": BYTELEVEL},
    ],
)
def test_pre_tokenizers_llama_cpp_lacks_are_refused(doc):
    with pytest.raises(GGUFError, match=r"llama\.cpp|cannot be expressed"):
        pre_tokenizer_name(doc)


def test_wordpiece_vocabulary_cannot_be_expressed(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}))
    with pytest.raises(GGUFError, match="cannot be expressed"):
        tokenizer_from_folder(tmp_path, 10)


def test_vocabulary_larger_than_embeddings_is_refused(tiny):
    with pytest.raises(GGUFError, match="does not fit the model's 100 embedding rows"):
        tokenizer_from_folder(tiny, 100)


@pytest.mark.parametrize("algo", ["gptq", "awq+gptq"])
def test_calibrated_codes_are_packed_exactly(make_checkpoint, tmp_path, algo):
    """GPTQ/AWQ results land in the file as they are: gguf-py reads back exactly their dequantize()."""
    from qkiln.formats.hf import Checkpoint
    from qkiln.pipeline.stream import quantize_weights, tensor_schemes
    from qkiln.quantize.tensor import QuantizedTensor

    ckpt = Checkpoint.open(make_checkpoint())
    config = ckpt.config
    schemes, _ = tensor_schemes(config, {n: ckpt.shape(n) for n in ckpt.names()}, "q4_0")
    calib = [Path("/usr/share/common-licenses/GPL-3")]
    weights = quantize_weights(ckpt, schemes, algo, calib, samples=4, seq_len=64)
    assert sum(isinstance(w, QuantizedTensor) for w in weights.values()) == 16
    tok = tokenizer_from_folder(ckpt.path, config.vocab_size)
    out = tmp_path / "m.gguf"
    write_llama_gguf(out, config, weights, tok, Provenance(name="t", scheme="q4_0", algorithm=algo), float_type="f16")
    back = read_back(out, config)
    for name, w in weights.items():
        want = w.dequantize() if isinstance(w, QuantizedTensor) else w
        np.testing.assert_array_equal(back[name], want, err_msg=name)
    if algo == "gptq":  # GPTQ changes codes (not RTN's), yet they are what the file holds
        from qkiln.quantize.registry import get_scheme
        from qkiln.quantize.rtn import quantize_rtn

        name = "model.layers.1.mlp.down_proj.weight"
        rtn = quantize_rtn(np.asarray(ckpt.tensor(name)), get_scheme("q4_0"), name=name)
        assert (rtn.codes != weights[name].codes).any()


def test_import_gguf_gives_back_the_checkpoint_on_the_grid(tiny, tmp_path):
    """K-quant artifact of a llama3-rope model -> import-gguf: same config (rope scaling recovered from
    rope_freqs), every weight equal to the QuantizedTensor's dequantize()."""
    pytest.importorskip("qkiln.quantize.kquants", reason="K-quant grids not available")
    from qkiln.formats.gguf_import import import_gguf
    from qkiln.formats.hf import Checkpoint
    from qkiln.pipeline.stream import quantize_weights, tensor_schemes
    from qkiln.quantize.tensor import QuantizedTensor

    src = Checkpoint.open(tiny)
    schemes, fallbacks = tensor_schemes(src.config, {n: src.shape(n) for n in src.names()}, "q4_k_m")
    assert not fallbacks and {"q4_k", "q6_k"} <= set(schemes.values())
    weights = quantize_weights(src, schemes, "rtn", [])
    out = tmp_path / "m.gguf"
    write_llama_gguf(out, src.config, weights, tokenizer_from_folder(tiny, 512), PROV)
    back = Checkpoint.open(import_gguf(out, tmp_path / "back"))
    # llama3 scaling travels as rope_freqs (what llama.cpp reads) plus rope.scaling.original_context_length,
    # from which the importer recovers the exact parameters (64 here, not Llama 3's 8192).
    np.testing.assert_allclose(rope_freq_factors(back.config), rope_freq_factors(src.config), rtol=1e-6)
    assert back.config == src.config
    for name, w in weights.items():
        want = w.dequantize() if isinstance(w, QuantizedTensor) else w
        np.testing.assert_array_equal(np.asarray(back.tensor(name)), want, err_msg=name)
