"""Golden tests against transformers: what save_pretrained writes, we read; what our fixture writes, it loads."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.formats.hf import Checkpoint

pytestmark = pytest.mark.torch

torch = pytest.importorskip("torch", reason="golden tests need torch")
transformers = pytest.importorskip("transformers", reason="golden tests need transformers")


def _hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    return transformers.LlamaForCausalLM(hf_cfg).eval()


@pytest.mark.parametrize(("dtype", "tied", "shard"), [("bfloat16", False, "100KB"), ("float16", True, None)])
def test_reads_what_save_pretrained_writes(tmp_path, tiny_config, dtype, tied, shard):
    cfg = tiny_config(tie_word_embeddings=tied)
    model = _hf_model(cfg).to(getattr(torch, dtype))
    out = tmp_path / "hf"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    ckpt = Checkpoint.open(out)
    assert (len(ckpt.files) > 1) == bool(shard)
    assert ckpt.config.tie_word_embeddings == tied
    state = model.state_dict()
    for name in ckpt.names():
        want = state[name].float().numpy()
        np.testing.assert_array_equal(ckpt.tensor(name), want, err_msg=name)
    assert set(ckpt.names()) | ({"lm_head.weight"} if tied else set()) == set(state)


def test_transformers_loads_the_fixture_checkpoint(make_checkpoint, llama_weights, tiny_config):
    cfg = tiny_config()
    path = make_checkpoint(cfg, dtype="BF16", shards=2)
    model = transformers.LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    state = model.state_dict()
    for name, want in llama_weights(cfg, dtype="BF16").items():
        np.testing.assert_array_equal(state[name].numpy(), want, err_msg=name)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The model weight is 42.")["input_ids"]
    assert tok.decode(ids) == "The model weight is 42."
    assert tok.bos_token_id == cfg.bos_token_id and tok.eos_token_id == cfg.eos_token_id
