"""The synthetic checkpoint: real shapes, readable by qkiln's loaders, deterministic per tensor, streaming, and
activations that stay in range through the NumPy runtime.

Disk is kept small (a few tens of MB per folder): width-reduced variants keep the real vocabulary (128256) and
the llama3 rope scaling but shrink hidden/intermediate sizes. The activation test runs llama-3.2-1b at full
width from memory (`SynthSource`, the same bytes `write_synth` writes), never written to disk.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from qkiln.errors import UserError
from qkiln.formats.hf import Checkpoint
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder
from qkiln.model.config import LlamaConfig
from qkiln.pipeline.synth import (
    BF16,
    CHUNK_ELEMENTS,
    SHAPES,
    SynthSource,
    init_std,
    synth_config,
    synth_tensor,
    write_synth,
)

# A llama-3.2-1b with the real vocabulary and rope but 1/8 of the width (head_dim 64, 4 heads, 1 KV head).
NARROW_1B = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 1}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_shapes_are_the_published_configs():
    """Numbers from the models' config.json (Llama-3.1-8B, Llama-3.2-1B as mirrored on the hub)."""
    c8 = synth_config("llama-3-8b")
    assert (c8["hidden_size"], c8["num_hidden_layers"], c8["num_attention_heads"], c8["num_key_value_heads"],
            c8["intermediate_size"], c8["vocab_size"], c8["rope_theta"], c8["tie_word_embeddings"]) == (
        4096, 32, 32, 8, 14336, 128256, 500000.0, False)
    assert c8["rope_scaling"] == {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}
    c1 = synth_config("llama-3.2-1b")
    assert (c1["hidden_size"], c1["num_hidden_layers"], c1["num_attention_heads"], c1["num_key_value_heads"],
            c1["intermediate_size"], c1["vocab_size"], c1["tie_word_embeddings"], c1["rope_scaling"]["factor"]) == (
        2048, 16, 32, 8, 8192, 128256, True, 32.0)
    for name in SHAPES:
        cfg = synth_config(name)
        assert cfg["torch_dtype"] == "bfloat16" and cfg["architectures"] == ["LlamaForCausalLM"]
    from qkiln.demo import demo_model_dir

    demo = json.loads((demo_model_dir() / "config.json").read_text())
    assert synth_config("smollm2-135m") == {**demo, "torch_dtype": "bfloat16"}
    # 8B: 8.03 B parameters, as Meta states
    src = SynthSource("llama-3-8b")
    n = sum(int(np.prod(src.shape(t))) for t in src.names())
    assert 8.0e9 < n < 8.1e9


def test_bad_names_and_layers_are_user_errors():
    with pytest.raises(UserError, match="unknown --config 'llama-9'"):
        synth_config("llama-9")
    with pytest.raises(UserError, match="at least one decoder layer"):
        synth_config("llama-3-8b", layers=0)


def test_tensor_bytes_depend_on_seed_and_name_only():
    a = synth_tensor("model.layers.3.mlp.up_proj.weight", (300, 70), 0, 16)
    assert a.dtype == BF16 and a.shape == (300, 70)
    assert np.array_equal(a.view(np.uint16), synth_tensor("model.layers.3.mlp.up_proj.weight", (300, 70), 0, 16).view(np.uint16))
    assert not np.array_equal(a.view(np.uint16), synth_tensor("model.layers.3.mlp.up_proj.weight", (300, 70), 1, 16).view(np.uint16))
    assert not np.array_equal(a.view(np.uint16), synth_tensor("model.layers.4.mlp.up_proj.weight", (300, 70), 0, 16).view(np.uint16))
    assert abs(float(a.astype(np.float32).std()) - 0.02) < 0.001
    down = synth_tensor("model.layers.3.mlp.down_proj.weight", (70, 300), 0, 16).astype(np.float32)
    assert abs(float(down.std()) - init_std("model.layers.3.mlp.down_proj.weight", 16)) < 0.0002
    assert init_std("model.layers.3.mlp.down_proj.weight", 16) == pytest.approx(0.02 / np.sqrt(32))
    assert np.all(synth_tensor("model.norm.weight", (64,), 0, 16).astype(np.float32) == 1.0)


def test_a_big_tensor_is_generated_without_a_float_copy():
    """Memory while generating: the BF16 result plus one chunk's float32 scratch (traced NumPy allocations)."""
    shape = (8192, 4096)  # 64 MiB in BF16; a float32 copy would be 128 MiB, float64 256 MiB
    tracemalloc.start()
    out = synth_tensor("model.layers.0.mlp.gate_proj.weight", shape, 0, 32)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.nbytes == 8192 * 4096 * 2
    assert peak < out.nbytes + 3 * CHUNK_ELEMENTS * 4, peak  # the chunk, its scaled copy's cast, slack


def _write(tmp_path: Path, name: str = "m", **kw) -> Path:
    dest = tmp_path / name
    write_synth(dest, "llama-3.2-1b", overrides=NARROW_1B, **kw)
    return dest


def test_folder_is_a_checkpoint_qkiln_and_the_gguf_export_read(tmp_path):
    dest = _write(tmp_path, layers=2, shard_bytes=2 * 10**6)
    files = sorted(p.name for p in dest.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json"} <= set(files)
    for s in shards:  # no shard above the size asked for, unless one tensor alone is larger (the embedding)
        assert (dest / s).stat().st_size <= 2 * 10**6 + 4096 or s == shards[0]
    ckpt = Checkpoint.open(dest)
    assert {ckpt.dtype(n) for n in ckpt.names()} == {"BF16"}
    cfg = ckpt.config
    assert cfg.num_hidden_layers == 2 and cfg.vocab_size == 128256 and cfg.rope_scaling is not None
    assert cfg.rope_scaling.factor == 32.0 and cfg.tie_word_embeddings
    src = SynthSource("llama-3.2-1b", layers=2, overrides=NARROW_1B)
    for n in ("model.embed_tokens.weight", "model.layers.1.self_attn.o_proj.weight", "model.norm.weight"):
        assert np.array_equal(ckpt.tensor(n), src.tensor(n))
    config = json.loads((dest / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    assert json.loads((dest / "generation_config.json").read_text()) == {"bos_token_id": 128000, "eos_token_id": 128001}

    tok = ckpt.tokenizer()
    assert tok.get_vocab_size(with_added_tokens=True) == 128256
    assert tok.token_to_id("<|begin_of_text|>") == 128000 and tok.token_to_id("<|end_of_text|>") == 128001
    assert tok.token_to_id("<|reserved_special_token_0|>") == 49152
    assert tok.encode("Hello world", add_special_tokens=False).ids  # the demo's BPE still works
    gguf_tok = tokenizer_from_folder(dest, cfg.vocab_size, {"bos_token_id": 128000, "eos_token_id": 128001})
    assert len(gguf_tok.tokens) == 128256 and gguf_tok.bos_id == 128000 and gguf_tok.eos_id == 128001
    assert gguf_tok.pre == "smollm" and not any(t.startswith("[PAD") for t in gguf_tok.tokens)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # the atomic temporary is gone


def test_same_seed_same_bytes_whatever_the_layers_and_shards(tmp_path):
    # keep the disk small: 256 padding tokens only, so bos/eos are the demo tokenizer's own
    small = {**NARROW_1B, "vocab_size": 49408, "bos_token_id": 1, "eos_token_id": 2}
    a = tmp_path / "a"
    write_synth(a, "llama-3.2-1b", layers=2, overrides=small, shard_bytes=10**9)
    b = tmp_path / "b"
    write_synth(b, "llama-3.2-1b", layers=2, overrides=small, shard_bytes=10**9)
    assert {p.name: _sha(p) for p in a.iterdir()} == {p.name: _sha(p) for p in b.iterdir()}
    c = tmp_path / "c"
    write_synth(c, "llama-3.2-1b", layers=1, overrides=small, shard_bytes=5 * 10**6)
    ca, cc = Checkpoint.open(a), Checkpoint.open(c)
    for n in cc.names():  # a 1-layer model is the first layer of the 2-layer one, byte for byte
        assert np.array_equal(ca.tensor(n), cc.tensor(n)), n
    d = tmp_path / "d"
    write_synth(d, "llama-3.2-1b", layers=1, overrides=small, seed=1)
    assert not np.array_equal(Checkpoint.open(d).tensor("model.embed_tokens.weight"), cc.tensor("model.embed_tokens.weight"))


def test_existing_output_is_refused_and_nothing_is_left(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        write_synth(f, "smollm2-135m", layers=1)
    assert f.read_text() == "x"
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_synth(tmp_path / "dir", "smollm2-135m", layers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]


def _layer_rms(name: str, *, layers: int | None = None, overrides: dict | None = None, tokens: int = 32):
    from qkiln.runtime.llama import LlamaModel

    src = SynthSource(name, layers=layers, overrides=overrides)
    model = LlamaModel(src, cache_weights=False)
    ids = np.random.default_rng(0).integers(0, src.config.vocab_size, size=(1, tokens))
    h = model.embed(ids)
    rms = [float(np.sqrt(np.mean(h.astype(np.float64) ** 2)))]
    for i in range(src.config.num_hidden_layers):
        h = model.layer(i, h)
        assert np.isfinite(h).all(), i
        rms.append(float(np.sqrt(np.mean(h.astype(np.float64) ** 2))))
    logits = model.head(h)
    return rms, logits


@pytest.mark.slow
def test_activations_stay_in_range_llama_3_2_1b_full_width():
    """llama-3.2-1b at full width, all 16 layers, through the NumPy runtime (from memory: nothing written):
    finite everywhere; the residual stream's RMS (0.02 after the embedding) grows like sqrt(layer) as each layer
    adds its bounded variance (measured: 0.17 after layer 1, 0.35 after 4, 0.71 after 16), never above 1;
    logits finite with a std near 1 (a near-uniform softmax, as an untrained model should give)."""
    rms, logits = _layer_rms("llama-3.2-1b")
    print("hidden RMS per layer:", [round(r, 4) for r in rms], "logit std", float(logits.std()))
    assert len(rms) == 17 and np.isfinite(logits).all()
    assert 0.015 < rms[0] < 0.025
    assert all(0.1 < r < 1.0 for r in rms[1:]), rms
    assert all(b >= a * 0.9 for a, b in itertools.pairwise(rms[1:])), rms  # no collapse either
    assert rms[-1] / rms[1] < 2 * np.sqrt(16), rms
    assert 0.3 < float(logits.std()) < 3.0


@pytest.mark.parametrize("name, width", [
    ("llama-3.2-1b", NARROW_1B),
    ("llama-3-8b", {"hidden_size": 256, "intermediate_size": 896, "num_attention_heads": 2, "num_key_value_heads": 1,
                    "vocab_size": 49152 + 256}),
])
def test_activations_stay_in_range_through_every_layer(name, width):
    """All of the model's layers (16, 32) at reduced width: the RMS after the last layer stays within a small
    factor of the first layer's (the 1/sqrt(2·depth) residual scaling bounds the sum), nothing overflows."""
    rms, logits = _layer_rms(name, overrides=width)
    print(name, "hidden RMS per layer:", [round(r, 4) for r in rms])
    depth = len(rms) - 1
    assert depth == synth_config(name)["num_hidden_layers"]
    assert np.isfinite(logits).all()
    assert max(rms[1:]) < 1.0
    assert rms[-1] / rms[1] < 2 * np.sqrt(depth), rms


def test_config_survives_the_config_reader():
    for name in SHAPES:
        cfg = LlamaConfig.from_dict(synth_config(name, layers=2))
        assert cfg.num_hidden_layers == 2


@pytest.mark.torch
def test_transformers_loads_the_folder_and_agrees_with_the_runtime(tmp_path):
    """transformers' LlamaForCausalLM and AutoTokenizer take the folder as it is (llama3 rope, tied table, the
    padded vocabulary), and its logits equal qkiln's NumPy runtime's on the same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from qkiln.runtime.llama import LlamaModel

    dest = _write(tmp_path, layers=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(dest), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(dest))
    assert len(tok) == 128256 and tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    ids = np.random.default_rng(0).integers(0, 128256, size=(1, 16))
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()
    ours = LlamaModel(Checkpoint.open(dest)).forward(ids)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * float(np.abs(ref).max()))
