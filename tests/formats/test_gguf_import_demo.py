"""Round trip on the real demo GGUF (SmolLM2-135M-Instruct, Q4_1): every tensor exact, config right."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from qkiln.formats.gguf_import import import_gguf
from qkiln.model.names import gguf_to_hf_name

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def demo_gguf():
    from qkiln.demo import demo_gguf_path
    from qkiln.errors import UserError

    try:
        return demo_gguf_path()
    except UserError as e:
        pytest.skip(f"demo GGUF not installed: {e}")


@pytest.fixture(scope="session")
def demo_import(demo_gguf, tmp_path_factory):
    """The folder the demo GGUF was imported into, fresh, once per session (its speed is bench/'s subject,
    not a test's: a busy host would fail a timed assertion)."""
    dest = tmp_path_factory.mktemp("demo_import") / "SmolLM2-135M-Instruct"
    import_gguf(demo_gguf, dest)
    return dest


def _unpermute_by_index(w: np.ndarray, heads: int) -> np.ndarray:
    head_dim = w.shape[0] // heads
    half = head_dim // 2
    j = np.arange(head_dim)
    return w[(np.arange(heads)[:, None] * head_dim + 2 * (j % half) + j // half).reshape(-1)]


def test_config(demo_import):
    cfg = json.loads((demo_import / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"], cfg["head_dim"]) == (576, 1536, 30, 9, 3, 49152, 64)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5 and cfg["max_position_embeddings"] == 8192
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    tc = json.loads((demo_import / "tokenizer_config.json").read_text())
    assert tc["bos_token"] == "<|im_start|>" and tc["eos_token"] == "<|im_end|>" and tc["add_bos_token"] is False
    assert "<|im_start|>assistant" in tc["chat_template"]


def test_every_tensor_equals_dequantized_source(demo_gguf, demo_import):
    reader = gguf.GGUFReader(str(demo_gguf))
    with safe_open(str(demo_import / "model.safetensors"), "np") as st:
        names = set(st.keys())
        assert "lm_head.weight" not in names  # tied
        assert len(names) == len(reader.tensors) == 272
        for t in reader.tensors:
            want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            if ".attn_q." in t.name:
                want = _unpermute_by_index(want, 9)
            elif ".attn_k." in t.name:
                want = _unpermute_by_index(want, 3)
            got = st.get_tensor(gguf_to_hf_name(t.name, 30))
            assert got.dtype == np.float32 and np.array_equal(got, want), t.name
