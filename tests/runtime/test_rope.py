"""RoPE tables and rotation: transformers' frequencies (default and llama3), rotate_half layout, growth."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qkiln.kernels.reference import apply_rope
from qkiln.model.config import LlamaConfig, RopeScaling
from qkiln.runtime.rope import RopeTable, inv_frequencies

CFG = LlamaConfig(
    vocab_size=10,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    rope_theta=500000.0,
    max_position_embeddings=64,
)
LLAMA3 = RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)


def rotate_half_reference(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """transformers' formula literally: x * cat(cos, cos) + cat(-x2, x1) * cat(sin, sin)."""
    half = x.shape[-1] // 2
    c = np.concatenate([cos, cos], axis=-1)[None, :, None, :]
    s = np.concatenate([sin, sin], axis=-1)[None, :, None, :]
    rot = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * c + rot * s


def test_apply_rope_is_transformers_rotate_half():
    x = np.random.default_rng(0).standard_normal((2, 7, 3, 32)).astype(np.float32)
    cos, sin = RopeTable(CFG).get(5, 7)
    np.testing.assert_allclose(
        apply_rope(x, cos, sin), rotate_half_reference(x, cos, sin), rtol=1e-6, atol=1e-6
    )


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 1, 1, 1, 32)).astype(np.float64)
    table = RopeTable(CFG)

    def score(pq: int, pk: int) -> float:
        rq = apply_rope(q, *(a.astype(np.float64) for a in table.get(pq, 1)))
        rk = apply_rope(k, *(a.astype(np.float64) for a in table.get(pk, 1)))
        return float(np.sum(rq * rk))

    assert score(10, 3) == pytest.approx(score(40, 33), rel=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), rel=1e-3)


def test_table_grows_beyond_its_first_size():
    table = RopeTable(dataclasses.replace(CFG, max_position_embeddings=16))
    cos, sin = table.get(3000, 5)
    pos = np.arange(3000, 3005, dtype=np.float32)[:, None] * table.inv_freq[None, :]
    np.testing.assert_array_equal(cos, np.cos(pos))
    np.testing.assert_array_equal(sin, np.sin(pos))
    assert table.cos.shape[0] >= 3005


def test_llama3_bands():
    """Short wavelengths kept, long ones divided by factor, the band between interpolated (monotone)."""
    plain = inv_frequencies(128, 500000.0)
    scaled = inv_frequencies(128, 500000.0, LLAMA3)
    wavelen = 2 * np.pi / plain
    high = wavelen < 8192 / 4
    low = wavelen > 8192 / 1
    assert high.any() and low.any() and (~high & ~low).any()
    np.testing.assert_array_equal(scaled[high], plain[high])
    np.testing.assert_allclose(scaled[low], plain[low] / 8, rtol=1e-6)
    ratio = scaled / plain
    assert np.all(np.diff(ratio) <= 1e-7)  # from 1 down to 1/8 as wavelength grows


@pytest.mark.torch
@pytest.mark.parametrize(
    ("head_dim", "theta", "scaling"), [(64, 10000.0, None), (24, 10000.0, None), (128, 500000.0, LLAMA3)]
)
def test_frequencies_equal_transformers(head_dim, theta, scaling):
    pytest.importorskip("torch", reason="reference frequencies come from transformers")
    transformers = pytest.importorskip("transformers", reason="reference frequencies come from transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = dataclasses.replace(CFG, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_dict())
    if scaling is None:
        ref, _ = LlamaRotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    else:
        ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = inv_frequencies(head_dim, theta, scaling)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.numpy(), rtol=2e-7, atol=0)
