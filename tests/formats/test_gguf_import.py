"""GGUF import: exact dequantized weights, q/k permutation, config and tokenizer files, refusals."""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from qkiln.errors import GGUFError, UserError
from qkiln.formats.gguf_import import import_gguf
from qkiln.model.config import LlamaConfig
from qkiln.model.names import gguf_to_hf_name, hf_modules, hf_to_gguf_name, permute_qk, unpermute_qk


def _unpermute_by_index(w: np.ndarray, heads: int) -> np.ndarray:
    """An independent statement of the inverse: HF row j of a head is GGML row 2*(j mod half) + j div half."""
    head_dim = w.shape[0] // heads
    half = head_dim // 2
    j = np.arange(head_dim)
    src = (np.arange(heads)[:, None] * head_dim + 2 * (j % half) + j // half).reshape(-1)  # (rows,)
    return w[src]


# -- permutation --------------------------------------------------------------------------------------


def test_permute_matches_llama_cpp_layout():
    w = np.arange(16, dtype=np.float32)[:, None]  # 2 heads of 8 rows
    assert permute_qk(w, 2).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    # GQA k: the kv head count decides the head size
    k = np.arange(8, dtype=np.float32)[:, None]
    assert permute_qk(k, 4, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(heads=st.integers(1, 6), kv_div=st.sampled_from([1, 2, 3]), half=st.integers(1, 8), cols=st.integers(1, 5))
def test_unpermute_inverts_permute(heads, kv_div, half, cols):
    n_head, n_kv = heads * kv_div, heads
    rng = np.random.default_rng(heads * 100 + half)
    q = rng.standard_normal((n_head * 2 * half, cols)).astype(np.float32)
    k = rng.standard_normal((n_kv * 2 * half, cols)).astype(np.float32)
    assert np.array_equal(unpermute_qk(permute_qk(q, n_head), n_head), q)
    assert np.array_equal(unpermute_qk(permute_qk(k, n_head, n_kv), n_head, n_kv), k)
    assert np.array_equal(permute_qk(unpermute_qk(k, n_head, n_kv), n_head, n_kv), k)
    assert np.array_equal(unpermute_qk(k, n_head, n_kv), _unpermute_by_index(k, n_kv))


def test_permutation_turns_rotate_half_rope_into_interleaved_rope():
    """Why the permutation exists: HF's rotate_half RoPE on W x equals GGML's pairwise RoPE on permute(W) x."""
    heads, head_dim, hidden, pos = 2, 8, 5, 7
    rng = np.random.default_rng(0)
    w = rng.standard_normal((heads * head_dim, hidden))
    x = rng.standard_normal(hidden)
    theta = pos * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # (head_dim/2,)
    cos, sin = np.cos(theta), np.sin(theta)
    q = (w @ x).reshape(heads, 2, head_dim // 2)  # HF: pair (i, i + half)
    hf = np.concatenate([q[:, 0] * cos - q[:, 1] * sin, q[:, 0] * sin + q[:, 1] * cos], axis=1)
    g = (permute_qk(w, heads) @ x).reshape(heads, head_dim // 2, 2)  # GGML: pair (2i, 2i+1)
    gg = np.stack([g[..., 0] * cos - g[..., 1] * sin, g[..., 0] * sin + g[..., 1] * cos], axis=-1)
    assert np.allclose(unpermute_qk(gg.reshape(-1, 1), heads).reshape(heads, head_dim), hf)


def test_names_round_trip():
    for module in hf_modules(3):
        hf = f"{module}.weight"
        assert gguf_to_hf_name(hf_to_gguf_name(hf, 3), 3) == hf
    assert hf_to_gguf_name("model.layers.2.self_attn.q_proj.weight", 3) == "blk.2.attn_q.weight"
    assert hf_to_gguf_name("lm_head.weight", 3) == "output.weight"
    with pytest.raises(KeyError):
        gguf_to_hf_name("blk.3.attn_q.weight", 3)


# -- import -------------------------------------------------------------------------------------------


def _reference(path) -> dict[str, np.ndarray]:
    """gguf-py's own reading and dequantization of every tensor, in numpy order."""
    r = gguf.GGUFReader(str(path))
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            for t in r.tensors}


@pytest.mark.parametrize("tied", [False, True])
def test_synthetic_import_equals_dequantized_source(make_gguf, tmp_path, tied):
    src = make_gguf(tied=tied)
    dest = import_gguf(src, tmp_path / "hf")
    got = load_file(str(dest / "model.safetensors"))
    ref = _reference(src)
    cfg = LlamaConfig.from_file(dest / "config.json")
    assert len(got) == len(ref)
    for name, want in ref.items():
        hf = gguf_to_hf_name(name, 2)
        if "attn_q" in name:
            want = _unpermute_by_index(want, cfg.num_attention_heads)
        elif "attn_k" in name:
            want = _unpermute_by_index(want, cfg.num_key_value_heads)
        assert got[hf].dtype == np.float32 and got[hf].shape == want.shape, name
        assert np.array_equal(got[hf], want.astype(np.float32)), name
    assert ("lm_head.weight" in got) is (not tied)
    assert cfg.tie_word_embeddings is tied


def test_synthetic_config_and_tokenizer_files(make_gguf, tmp_path):
    dest = import_gguf(make_gguf(), tmp_path / "hf")
    cfg = json.loads((dest / "config.json").read_text())
    assert {k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings",
                                "rms_norm_eps", "rope_theta", "bos_token_id", "eos_token_id")} == {
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 262, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2}
    tc = json.loads((dest / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == "<|im_start|>" and tc["eos_token"] == "<|im_end|>" and tc["pad_token"] == "<|im_end|>"
    assert tc["add_bos_token"] is False and tc["chat_template"].startswith("{% for m in messages %}")
    assert tc["added_tokens_decoder"]["0"] == {"content": "<|endoftext|>", "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}
    gen = json.loads((dest / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 2)
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    # merges applied, digits split one by one (smollm), control tokens matched whole
    assert tok.encode("the 12<|im_end|>").tokens == ["t", "he", "Ġ", "1", "2", "<|im_end|>"]
    assert tok.decode(tok.encode("héllo wörld").ids) == "héllo wörld"


def test_import_is_deterministic(make_gguf, tmp_path):
    src = make_gguf()
    a, b = import_gguf(src, tmp_path / "a"), import_gguf(src, tmp_path / "b")
    for f in sorted(p.name for p in a.iterdir()):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_add_bos_token_from_metadata(make_gguf, tmp_path):
    src = make_gguf(extra_meta=lambda w: w.add_add_eos_token(True))
    dest = import_gguf(src, tmp_path / "hf")
    tok = Tokenizer.from_file(str(dest / "tokenizer.json"))
    assert tok.encode("he").ids[-1] == 2  # eos appended by the post-processor
    assert json.loads((dest / "tokenizer_config.json").read_text())["add_eos_token"] is True


def _rope_freqs(factor=8.0, low=1.0, high=4.0, orig=8192, head_dim=64, base=500000.0) -> np.ndarray:
    """llama.cpp converter's per-frequency divisors for llama3 rope scaling."""
    inv = base ** (-np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    return np.where(wavelen < orig / high, 1.0,
                    np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth))).astype(np.float32)


def test_llama3_rope_scaling_recovered_from_rope_freqs(make_gguf, tmp_path):
    src = make_gguf(extra_tensors={"rope_freqs.weight": _rope_freqs(base=10000.0, orig=64)})
    cfg = LlamaConfig.from_file(import_gguf(src, tmp_path / "hf") / "config.json")
    assert cfg.rope_scaling is not None
    # orig context 8192 is assumed without metadata; the fitted band must still reproduce every divisor
    rs = cfg.rope_scaling
    assert rs.factor == 8.0 and rs.original_max_position_embeddings == 8192
    assert np.allclose(_rope_freqs(rs.factor, rs.low_freq_factor, rs.high_freq_factor, 8192, base=10000.0),
                       _rope_freqs(base=10000.0, orig=64), rtol=1e-5)


def test_llama3_rope_scaling_with_published_factors(make_gguf, tmp_path):
    src = make_gguf(extra_tensors={"rope_freqs.weight": _rope_freqs(factor=32.0, low=1.0, high=4.0, orig=8192,
                                                                     base=10000.0)})
    rs = LlamaConfig.from_file(import_gguf(src, tmp_path / "hf") / "config.json").rope_scaling
    assert rs is not None
    assert (rs.factor, rs.low_freq_factor, rs.high_freq_factor) == (32.0, 1.0, 4.0)


def test_refuses_other_architecture(make_gguf, tmp_path):
    src = make_gguf(arch="qwen2")
    with pytest.raises(GGUFError, match=r"architecture 'qwen2' is not supported; qkiln imports only 'llama'"):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_type_gguf_py_cannot_dequantize(make_gguf, tmp_path):
    src = make_gguf()
    blob = bytearray(src.read_bytes())
    r = gguf.GGUFReader(str(src))
    field = next(t.field for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    type_at = field.offset + sum(p.nbytes for p in field.parts[:-2])
    blob[type_at : type_at + 4] = int(gguf.GGMLQuantizationType.I32).to_bytes(4, "little")  # same 4-byte size
    src.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_norm\.weight' has type I32, which gguf-py cannot dequantize"):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_refuses_unexpected_or_missing_tensors(make_gguf, tmp_path):
    src = make_gguf(extra_tensors={"blk.0.attn_q.bias": np.zeros(256, np.float32)})
    with pytest.raises(GGUFError, match=r"tensor 'blk\.0\.attn_q\.bias' is not part of a 2-layer llama model"):
        import_gguf(src, tmp_path / "hf")
    src = make_gguf("three_layers.gguf")
    field = gguf.GGUFReader(str(src)).fields["llama.block_count"]
    at = field.offset + sum(p.nbytes for p in field.parts[:-1])
    blob = bytearray(src.read_bytes())
    blob[at : at + 4] = (3).to_bytes(4, "little")  # metadata now promises a third layer
    src.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"9 llama tensors are missing, e\.g\. 'model\.layers\.2\."):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_existing_output_needs_overwrite(make_gguf, tmp_path):
    src = make_gguf()
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match="already exists; remove it or pass --force"):
        import_gguf(src, tmp_path / "hf")
    assert import_gguf(src, tmp_path / "hf", overwrite=True) == tmp_path / "hf"
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_refuses_merge_outside_vocabulary(make_gguf, tmp_path):
    src = make_gguf()
    blob = src.read_bytes()
    from qkiln.formats.gguf_read import read_gguf

    assert blob.index(b"h e") < read_gguf(src).data_start  # the merge, not tensor bytes
    src.write_bytes(blob.replace(b"h e", b"h q", 1))  # "hq" is no token: tokenizers would panic on it
    with pytest.raises(GGUFError, match=r"merge 'h q' uses or makes a token that is not in the vocabulary"):
        import_gguf(src, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_random_header_damage_gives_user_errors_only(make_gguf, tmp_path):
    """Whatever the damage to the header (metadata, vocabulary, tensor infos), the import either works
    or raises a UserError: no numpy, tokenizers or struct exception escapes."""
    import random

    from qkiln.formats.gguf_read import read_gguf

    src = make_gguf(n_layers=1)
    blob, end = src.read_bytes(), read_gguf(src).data_start
    rng = random.Random(7)
    failures = 0
    for i in range(60):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            damaged[rng.randrange(end)] = rng.randrange(256)
        src.write_bytes(damaged)
        try:
            import_gguf(src, tmp_path / f"out{i}")
        except UserError as e:
            failures += 1
            assert "\n" not in str(e)
            assert not (tmp_path / f"out{i}").exists()
    assert failures > 30
