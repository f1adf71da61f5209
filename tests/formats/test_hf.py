"""Reading Hugging Face checkpoints: exact values per dtype, sharding, laziness, tokenizer, names/shapes."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from qkiln.errors import CheckpointError
from qkiln.formats.hf import Checkpoint, expected_shapes
from qkiln.model.source import TensorSource


def test_expected_shapes_cover_gqa_and_tied(tiny_config):
    cfg = tiny_config()
    shapes = expected_shapes(cfg)
    assert len(shapes) == 2 + 9 * cfg.num_hidden_layers + 1
    assert shapes["model.layers.1.self_attn.q_proj.weight"] == (64, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)  # 2 kv heads x head_dim 16
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (64, 64)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert shapes["lm_head.weight"] == (512, 64)
    assert "lm_head.weight" not in expected_shapes(tiny_config(tie_word_embeddings=True))
    # head_dim set explicitly (not hidden / heads), as some Mistral/Llama variants do
    odd = expected_shapes(tiny_config(head_dim=32))
    assert odd["model.layers.0.self_attn.q_proj.weight"] == (128, 64)
    assert odd["model.layers.0.self_attn.o_proj.weight"] == (64, 128)


@pytest.mark.parametrize(("dtype", "shards"), [("F32", 1), ("F16", 1), ("BF16", 3), ("F16", 2), ("BF16", 1)])
def test_reads_exactly_the_values_written(make_checkpoint, llama_weights, tiny_config, dtype, shards):
    cfg = tiny_config()
    ckpt = Checkpoint.open(make_checkpoint(cfg, dtype=dtype, shards=shards))
    expected = llama_weights(cfg, dtype=dtype)
    source: TensorSource = ckpt  # static check that Checkpoint satisfies the protocol (mypy)
    assert source.config == cfg
    assert ckpt.config == cfg
    assert ckpt.names() == sorted(expected)
    assert len(ckpt.files) == shards
    for name, want in expected.items():
        got = ckpt.tensor(name)
        assert got.dtype == np.float32
        assert ckpt.dtype(name) == dtype
        assert ckpt.shape(name) == got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=name)


def test_bf16_conversion_is_bit_exact_on_special_values(make_checkpoint, tiny_config):
    import ml_dtypes

    cfg = tiny_config()
    specials = np.array([0.0, -0.0, 1.0, -2.5, np.inf, -np.inf, 3.0e38, 1e-40, 2**-133], dtype=np.float32)
    row = np.resize(specials, cfg.hidden_size)
    norm = row.astype(ml_dtypes.bfloat16)
    path = make_checkpoint(cfg, dtype="BF16", extra={"model.norm.weight": norm})
    got = Checkpoint.open(path).tensor("model.norm.weight")
    np.testing.assert_array_equal(got.view(np.uint32), norm.astype(np.float32).view(np.uint32))


def test_f32_tensor_is_a_readonly_view_of_the_file(make_checkpoint):
    ckpt = Checkpoint.open(make_checkpoint())
    t = ckpt.tensor("model.embed_tokens.weight")
    assert not t.flags.writeable
    with pytest.raises(ValueError):
        t[0, 0] = 1.0


def test_reading_one_tensor_allocates_about_one_tensor(make_checkpoint, tiny_config):
    # Big embeddings so one tensor (8 MiB as float32) dwarfs the rest of the bookkeeping.
    cfg = tiny_config(vocab_size=16384, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    ckpt_path = make_checkpoint(cfg, dtype="BF16", tokenizer=False)
    ckpt = Checkpoint.open(ckpt_path)
    total_f32 = sum(np.prod(ckpt.shape(n)) * 4 for n in ckpt.names())
    one = 16384 * 128 * 4
    tracemalloc.start()
    try:
        t = ckpt.tensor("model.embed_tokens.weight")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.shape == (16384, 128)
    assert one <= peak < 1.2 * one, (peak, one)
    assert peak < 0.6 * total_f32  # embed + lm_head are each ~half the model; nothing else was read
    # opening reads headers only
    tracemalloc.start()
    try:
        Checkpoint.open(ckpt_path)
        _, peak_open = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_open < one / 20, peak_open


def test_tied_checkpoint_has_no_lm_head(make_checkpoint):
    ckpt = Checkpoint.open(make_checkpoint(tied=True))
    assert ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in ckpt.names()
    assert ckpt.summary()["shapes"]["lm_head"] == "tied to embed_tokens"


def test_tied_checkpoint_may_still_store_lm_head(make_checkpoint, tiny_config):
    cfg = tiny_config(tie_word_embeddings=True)
    lm = np.ones((cfg.vocab_size, cfg.hidden_size), np.float32)
    ckpt = Checkpoint.open(make_checkpoint(cfg, extra={"lm_head.weight": lm}))
    np.testing.assert_array_equal(ckpt.tensor("lm_head.weight"), lm)


def test_tied_checkpoint_with_a_wrong_lm_head_is_refused(make_checkpoint, tiny_config):
    cfg = tiny_config(tie_word_embeddings=True)
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' has shape \(64, 512\) but config.json implies \(512, 64\)"):
        Checkpoint.open(make_checkpoint(cfg, extra={"lm_head.weight": np.zeros((64, 512), np.float32)}))


def test_untied_checkpoint_without_lm_head_is_refused(make_checkpoint):
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' is missing"):
        Checkpoint.open(make_checkpoint(drop=["lm_head.weight"]))


def test_extra_tensors_like_rotary_inv_freq_are_ignored(make_checkpoint):
    inv = np.arange(8, dtype=np.float32)
    ckpt = Checkpoint.open(make_checkpoint(extra={"model.layers.0.self_attn.rotary_emb.inv_freq": inv}))
    assert ckpt.ignored == ["model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in ckpt.names()


def test_ignored_extra_tensor_may_have_any_dtype(make_checkpoint):
    ckpt = Checkpoint.open(make_checkpoint(extra={"model.some_int_buffer": np.arange(4, dtype=np.int64)}))
    assert ckpt.ignored == ["model.some_int_buffer"]


@pytest.mark.parametrize(
    ("name", "bad", "found", "want"),
    [
        ("model.layers.1.mlp.up_proj.weight", np.zeros((64, 128), np.float32), r"\(64, 128\)", r"\(128, 64\)"),
        ("model.norm.weight", np.zeros((65,), np.float32), r"\(65,\)", r"\(64,\)"),
    ],
)
def test_shape_that_disagrees_with_config_names_tensor_found_and_expected(make_checkpoint, name, bad, found, want):
    with pytest.raises(CheckpointError, match=rf"{name!r} has shape {found} but config.json implies {want}"):
        Checkpoint.open(make_checkpoint(extra={name: bad}))


@pytest.mark.parametrize("dtype", [np.int8, np.float64])
def test_unsupported_dtype_names_tensor_and_dtype(make_checkpoint, tiny_config, dtype):
    cfg = tiny_config()
    bad = np.zeros((cfg.intermediate_size, cfg.hidden_size), dtype)
    name = "model.layers.0.mlp.gate_proj.weight"
    dstr = {np.int8: "I8", np.float64: "F64"}[dtype]
    with pytest.raises(CheckpointError, match=rf"{name!r} has dtype {dstr}; qkiln reads only F32, F16 and BF16"):
        Checkpoint.open(make_checkpoint(cfg, extra={name: bad}))


def test_already_quantized_checkpoint_is_named_as_such(make_checkpoint):
    path = make_checkpoint(drop=["model.layers.0.self_attn.q_proj.weight"])
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"already quantized \(gptq\)"):
        Checkpoint.open(path)


def test_tokenizer_roundtrips_text(make_checkpoint, tiny_config):
    cfg = tiny_config()
    ckpt = Checkpoint.open(make_checkpoint(cfg))
    tok = ckpt.tokenizer()
    assert tok.get_vocab_size() == cfg.vocab_size
    text = "The model weight is 42. Hello wörld!"
    ids = tok.encode(text).ids
    assert max(ids) < cfg.vocab_size
    assert len(ids) < len(text.encode())  # merges were learned
    assert tok.decode(ids) == text
    assert tok.token_to_id("<s>") == cfg.bos_token_id and tok.token_to_id("</s>") == cfg.eos_token_id


def test_checkpoint_fixture_is_deterministic(make_checkpoint):
    a, b = make_checkpoint(name="a", shards=2), make_checkpoint(name="b", shards=2)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c = make_checkpoint(name="c", seed=1)
    assert not np.array_equal(
        Checkpoint.open(a).tensor("model.norm.weight"), Checkpoint.open(c).tensor("model.norm.weight")
    )


def test_tokenizer_path_missing_is_a_checkpoint_error(make_checkpoint):
    ckpt = Checkpoint.open(make_checkpoint(tokenizer=False))
    with pytest.raises(CheckpointError, match=r"has no tokenizer\.json"):
        ckpt.tokenizer_path()
    assert ckpt.summary()["tokenizer"] is False


def test_malformed_tokenizer_is_a_checkpoint_error(make_checkpoint):
    path = make_checkpoint()
    (path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(CheckpointError, match="cannot be loaded by the tokenizers library"):
        Checkpoint.open(path).tokenizer()


def test_summary_counts_parameters(make_checkpoint, tiny_config):
    cfg = tiny_config()
    s = Checkpoint.open(make_checkpoint(cfg, dtype="F16")).summary()
    n = sum(int(np.prod(v)) for v in expected_shapes(cfg).values())
    assert s["parameters"] == n
    assert s["dtype_parameters"] == {"F16": n}
    assert s["bytes"] == 2 * n
    assert s["shapes"]["k_proj"] == (32, 64)
    assert s["tokenizer"] is True
