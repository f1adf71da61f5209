"""The NumPy runtime against transformers' LlamaForCausalLM (CPU, float32, eager attention).

Rule: max |logits_ours - logits_hf| / max |logits_hf| <= 1e-4 over the whole (batch, seq, vocab) block.
float32 summation order differs between BLAS and torch, so exact equality is not expected; 1e-4 is
~100x the error we measure and far below what any real mistake (a wrong RoPE half, a wrong kv head,
a missed scale) produces.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qkiln.model.config import LlamaConfig, RopeScaling
from qkiln.model.source import DictSource
from qkiln.runtime.llama import LlamaModel

torch = pytest.importorskip("torch", reason="the reference model needs torch")
transformers = pytest.importorskip(
    "transformers", reason="the reference model is transformers' LlamaForCausalLM"
)

pytestmark = pytest.mark.torch

REL_TOL = 1e-4

BASE = LlamaConfig(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

CONFIGS = {
    "mha_untied": BASE,
    "gqa_8_2": dataclasses.replace(BASE, num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "tied": dataclasses.replace(BASE, tie_word_embeddings=True, num_key_value_heads=2),
    "llama3_rope": dataclasses.replace(
        BASE,
        num_key_value_heads=2,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
        ),
    ),
    "odd_head_dim": dataclasses.replace(BASE, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "mqa_3_layers": dataclasses.replace(
        BASE, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1
    ),
}


def hf_model(cfg: LlamaConfig, seed: int = 0):
    """A seeded LlamaForCausalLM with weights scaled so activations and logits are far from flat."""
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_dict())
    hf_cfg._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # RMSNorm gains: not all ones, so a missing gain shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def to_source(cfg: LlamaConfig, model) -> DictSource:
    sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # a tied checkpoint stores the embedding once
    return DictSource(cfg, sd)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    cfg = CONFIGS[request.param]
    model = hf_model(cfg)
    return cfg, model, LlamaModel(to_source(cfg, model))


def test_logits_match_transformers(pair):
    cfg, hf, ours = pair
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(3, 37))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    got = ours.forward(ids)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert float(np.std(ref)) > 0.5  # the comparison is not between near-constant logits
    assert rel_err(got, ref) <= REL_TOL


def test_far_positions_match_transformers(pair):
    """RoPE at positions in the thousands (llama3 bands, float32 angle rounding) still matches."""
    cfg, hf, ours = pair
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 20))
    start = 5000
    pos = torch.arange(start, start + ids.shape[1])[None, :].expand(ids.shape[0], -1)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), position_ids=pos).logits.numpy()
    got = ours.forward(ids, start_pos=start)  # no cache: start_pos shifts RoPE positions, like position_ids
    assert rel_err(got, ref) <= REL_TOL
