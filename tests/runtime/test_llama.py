"""The NumPy runtime's own contracts: layer API == forward, observer inputs, KV cache, greedy decoding,
tensor replacement and plugged linears. (Agreement with transformers: test_llama_vs_transformers.py.)"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from qkiln.errors import CheckpointError, UserError
from qkiln.kernels import reference
from qkiln.model.config import LlamaConfig
from qkiln.model.names import LINEARS, expected_shapes
from qkiln.model.source import DictSource
from qkiln.runtime.generate import KVCache, generate_greedy
from qkiln.runtime.llama import LlamaModel

CFG = LlamaConfig(
    vocab_size=200,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    eos_token_id=2,
)


def weights(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded weights with activations O(1): projections ~ N(0, 1/fan_in), gains ~ 1, embeddings ~ N(0, 1)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg, with_head=True).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if len(shape) == 1:
            w = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) * (2.0 / math.sqrt(shape[1]))  # peaked logits: argmax well defined
        out[name] = w.astype(np.float32)
    return out


def make(cfg: LlamaConfig = CFG, seed: int = 0, **kw) -> LlamaModel:
    return LlamaModel(DictSource(cfg, weights(cfg, seed)), **kw)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


IDS = np.random.default_rng(5).integers(0, CFG.vocab_size, size=(2, 24))  # (b, s)


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    return make()


def test_layer_by_layer_equals_forward(model):
    h = model.embed(IDS)
    assert h.shape == (2, 24, CFG.hidden_size) and h.dtype == np.float32
    for i in range(CFG.num_hidden_layers):
        h = model.layer(i, h)
    logits = model.head(h)
    assert logits.shape == (2, 24, CFG.vocab_size) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, model.forward(IDS))
    np.testing.assert_array_equal(model.hidden(IDS), h)


def test_streamed_weights_give_the_same_logits(model):
    streamed = make(cache_weights=False)
    assert rel(streamed.forward(IDS), model.forward(IDS)) <= 1e-5  # fused vs separate matmuls: rounding only
    assert streamed._layers == {} and streamed._globals == {}  # nothing kept between calls


def test_observer_sees_each_linears_exact_input():
    m = make(cache_weights=False)
    seen: dict[str, np.ndarray] = {}
    plugged: dict[str, np.ndarray] = {}
    layer = 1
    for short in LINEARS:  # dense ops that record what they are given
        name = f"model.layers.{layer}.{short}"
        w = m.tensor(name + ".weight")
        m.set_linear(name, lambda x, w=w, s=short: plugged.setdefault(s, x.copy()) @ w.T)
    h = m.embed(IDS)
    h = m.layer(0, h)
    m.layer(layer, h, observer=lambda n, x: seen.setdefault(n, x.copy()))
    t = IDS.size
    shapes = {
        "self_attn.q_proj": (t, 48),
        "self_attn.k_proj": (t, 48),
        "self_attn.v_proj": (t, 48),
        "self_attn.o_proj": (t, 6 * 12),
        "mlp.gate_proj": (t, 48),
        "mlp.up_proj": (t, 48),
        "mlp.down_proj": (t, 96),
    }
    assert {n: x.shape for n, x in seen.items()} == shapes
    for n in LINEARS:
        assert seen[n].dtype == np.float32
        np.testing.assert_array_equal(seen[n], plugged[n])


@pytest.mark.parametrize("batch", [1, 2])
def test_kv_cache_decoding_equals_full_forward(model, batch):
    ids = IDS[:batch]
    full = model.forward(ids)  # (b, 24, vocab)
    cache = KVCache(CFG, max_len=32, batch=batch)
    parts = [model.forward(ids[:, :9], cache=cache), model.forward(ids[:, 9:14], start_pos=9, cache=cache)]
    assert cache.length == 14
    for p in range(14, ids.shape[1]):
        parts.append(model.forward(ids[:, p : p + 1], start_pos=p, cache=cache))
    stepped = np.concatenate(parts, axis=1)
    assert rel(stepped, full) <= 1e-5
    assert cache.length == ids.shape[1]


def test_query_blocks_match_one_block(model, monkeypatch):
    """Scores computed in blocks of queries (bounded memory) equal the single-block result within float32
    summation order: each block is its own BLAS product, and a product's sum order may depend on its shape
    (1.8e-6 relative on an AVX2 host's OpenBLAS, 0 on AVX-512 ones) — a block that lost or repeated a query
    would be off by far more."""
    ids = np.random.default_rng(6).integers(0, CFG.vocab_size, size=(2, 61))
    one = model.forward(ids)
    cache_one = KVCache(CFG, 70, batch=2)
    model.forward(ids[:, :20], cache=cache_one)
    tail_one = model.forward(ids[:, 20:], start_pos=20, cache=cache_one)
    monkeypatch.setattr(reference, "_MIN_QUERY_BLOCK", 1)
    monkeypatch.setattr(reference, "_QUERY_BLOCKS", 9)  # blocks of 7 queries, and of 5 after the cached 20
    assert rel(model.forward(ids), one) <= 1e-5
    cache = KVCache(CFG, 70, batch=2)
    model.forward(ids[:, :20], cache=cache)
    assert rel(model.forward(ids[:, 20:], start_pos=20, cache=cache), tail_one) <= 1e-5
    assert rel(tail_one, one[:, 20:]) <= 1e-5
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 1)  # memory budget forces one query per block
    assert rel(model.forward(ids), one) <= 1e-5


def test_attention_is_causal(model):
    """Changing a later token leaves earlier positions' logits untouched."""
    ids = IDS.copy()
    ids[:, 15] = (ids[:, 15] + 1) % CFG.vocab_size
    a, b = model.forward(IDS), model.forward(ids)
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert not np.allclose(a[:, 15:], b[:, 15:])


def test_greedy_generation_equals_repeated_argmax(model):
    prompt = [int(t) for t in IDS[0, :6]]
    got = generate_greedy(model, prompt, 12, eos_ids=set())
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(np.argmax(model.forward(np.array([seq]))[0, -1])))
    assert got == seq[len(prompt) :]
    assert len(set(got)) > 1  # not a degenerate repetition


def test_greedy_generation_stops_at_eos(model):
    first = generate_greedy(model, IDS[0, :6], 12, eos_ids=set())
    stop_at = first[4]
    got = generate_greedy(model, IDS[0, :6], 12, eos_ids={stop_at})
    assert got == first[: first.index(stop_at) + 1]
    assert generate_greedy(model, IDS[0, :6], 0) == []


def test_replace_tensor_takes_effect_after_caching():
    base = weights(CFG)
    name = "model.layers.1.mlp.down_proj.weight"
    new = np.random.default_rng(9).standard_normal(base[name].shape).astype(np.float32) * 0.1
    m = make()
    before = m.forward(IDS)  # weights now cached (fused q/k/v, gate/up)
    m.replace_tensor(name, new)
    m.replace_tensor("model.layers.2.input_layernorm.weight", np.full(CFG.hidden_size, 0.5, np.float32))
    m.replace_tensor(
        "model.layers.0.self_attn.k_proj.weight", base["model.layers.0.self_attn.k_proj.weight"] * 2
    )
    expected = LlamaModel(
        DictSource(
            CFG,
            {
                **base,
                name: new,
                "model.layers.2.input_layernorm.weight": np.full(CFG.hidden_size, 0.5, np.float32),
                "model.layers.0.self_attn.k_proj.weight": base["model.layers.0.self_attn.k_proj.weight"] * 2,
            },
        )
    ).forward(IDS)
    after = m.forward(IDS)
    assert rel(after, before) > 1e-2
    np.testing.assert_array_equal(after, expected)
    np.testing.assert_array_equal(m.tensor(name), new)
    with pytest.raises(ValueError, match="shape"):
        m.replace_tensor(name, new.T)
    with pytest.raises(ValueError, match="not a tensor"):
        m.replace_tensor("model.layers.9.mlp.down_proj.weight", new)


def test_tied_head_follows_the_embedding():
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    w = weights(cfg)
    m = LlamaModel(DictSource(cfg, w))
    x = np.random.default_rng(3).standard_normal((1, 4, cfg.hidden_size)).astype(np.float32)
    before = m.head(x)
    emb = w["model.embed_tokens.weight"] * 1.5
    m.replace_tensor("model.embed_tokens.weight", emb)
    np.testing.assert_allclose(m.head(x), before * 1.5, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m.embed(IDS[:, :3]), emb[IDS[:, :3]])
    m.replace_tensor("lm_head.weight", w["model.embed_tokens.weight"])  # head on its own again
    np.testing.assert_array_equal(m.head(x), before)


def test_set_linear_takes_effect_and_can_be_removed():
    m = make()
    before = m.forward(IDS)
    name = "model.layers.0.self_attn.q_proj"
    w2 = m.tensor(name + ".weight") * -1.0
    calls = []

    def op(x: np.ndarray) -> np.ndarray:
        calls.append(x.shape)
        return x @ w2.T

    m.set_linear(name, op)
    m.set_linear("lm_head.weight", lambda x: np.zeros((x.shape[0], CFG.vocab_size), np.float32) + 1.0)
    out = m.forward(IDS)
    assert calls == [(IDS.size, CFG.hidden_size)]
    np.testing.assert_array_equal(out, np.ones_like(out))
    m.set_linear("lm_head", None)
    ref = make()
    ref.replace_tensor(name + ".weight", w2)
    np.testing.assert_allclose(m.forward(IDS), ref.forward(IDS), rtol=0, atol=1e-5 * np.abs(before).max())
    m.set_linear(name, None)
    np.testing.assert_array_equal(m.forward(IDS), before)
    with pytest.raises(ValueError, match="not a linear"):
        m.set_linear("model.layers.0.input_layernorm", op)
    m.set_linear(name, lambda x: x[:, :5])
    with pytest.raises(ValueError, match="returned shape"):
        m.forward(IDS)


def test_plugged_linear_weight_is_never_read():
    """With an op installed, the dense weight may be absent from memory (only the packed one exists)."""

    class Counting(DictSource):
        def __init__(self, *a):
            super().__init__(*a)
            self.read: list[str] = []

        def tensor(self, name):
            self.read.append(name)
            return super().tensor(name)

    src = Counting(CFG, weights(CFG))
    m = LlamaModel(src, cache_weights=False)
    w = src.tensor("model.layers.0.mlp.down_proj.weight")
    m.set_linear("model.layers.0.mlp.down_proj", lambda x: x @ w.T)
    src.read.clear()
    m.forward(IDS)
    assert "model.layers.0.mlp.down_proj.weight" not in src.read
    assert "model.layers.1.mlp.down_proj.weight" in src.read


def test_user_errors():
    w = weights(CFG)
    del w["lm_head.weight"]
    with pytest.raises(CheckpointError, match=r"lm_head\.weight"):
        LlamaModel(DictSource(CFG, w))
    w = weights(CFG)
    w["model.layers.0.mlp.up_proj.weight"] = w["model.layers.0.mlp.up_proj.weight"][:, :10]
    with pytest.raises(CheckpointError, match="shape"):
        LlamaModel(DictSource(CFG, w)).forward(IDS)
    m = make()
    with pytest.raises(UserError, match="outside the vocabulary"):
        m.forward(np.array([[1, CFG.vocab_size]]))
    cache = KVCache(CFG, 8, batch=1)
    with pytest.raises(UserError, match="positions"):
        m.forward(IDS[:1, :9], cache=cache)
    with pytest.raises(UserError, match="skips"):
        m.forward(IDS[:1, :2], start_pos=3, cache=KVCache(CFG, 8, batch=1))
    with pytest.raises(UserError, match="batch"):
        m.forward(IDS[:, :2], cache=KVCache(CFG, 8, batch=1))
