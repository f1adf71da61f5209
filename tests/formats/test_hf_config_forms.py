"""Checkpoints whose config.json transformers 5.25 itself wrote (`rope_parameters`), and the same checkpoints
with the config rewritten by hand in transformers 4.x keys (`rope_theta`, `rope_scaling`): qkiln's runtime and
llama.cpp on qkiln's F16 GGUF give transformers' logits.

Tolerances, as max |logits - logits_hf| / max |logits_hf| over the (1, 96, vocab) block:
- qkiln's NumPy runtime: 1e-4 (measured <= 1e-6; float32 both sides; only summation order differs, as in
  tests/runtime/test_llama_vs_transformers.py).
- llama.cpp on the F16 GGUF: 5e-3 (measured <= 9e-4), plus top-1 agreement at every position. The weights are made exactly
  representable in F16, so the file holds transformers' weights bit for bit; llama.cpp still rounds
  activations and the KV cache to F16 (relative error ~1e-3).
Each case also checks that reading the config the way the old reader did (theta 10000, no scaling), or
dropping only the llama3 scaling, is far outside these tolerances: the comparison catches issue 14's bug.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qkiln.formats.hf import Checkpoint
from qkiln.model.config import Rope, RopeScaling
from qkiln.model.source import DictSource
from qkiln.runtime.llama import LlamaModel

torch = pytest.importorskip("torch", reason="the reference is transformers' LlamaForCausalLM")
transformers = pytest.importorskip("transformers", reason="the reference is transformers' LlamaForCausalLM")

pytestmark = pytest.mark.torch

QKILN_TOL = 1e-4
LLAMACPP_TOL = 5e-3
N_POS = 96
VOCAB = 320

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
BASE: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
}
# name -> (LlamaConfig kwargs, saved dtype, max shard size, the rope qkiln must read)
CASES: dict[str, tuple[dict[str, Any], str, str | None, Rope]] = {
    "default_rope": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}, "tie_word_embeddings": True},
                     "float32", None, Rope(1000.0)),
    "llama3_rope": ({"rope_parameters": dict(LLAMA3), "num_key_value_heads": 2}, "bfloat16", "60KB",
                    Rope(500000.0, RopeScaling(8.0, 1.0, 4.0, 32))),
    "untied_head": ({"rope_parameters": {"rope_type": "default", "rope_theta": 2000.0}, "tie_word_embeddings": False},
                    "float32", None, Rope(2000.0)),
    "gqa_8_2": ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "num_attention_heads": 8,
                 "num_key_value_heads": 2}, "float32", None, Rope(500.0)),
    "head_dim_32": ({"rope_parameters": dict(LLAMA3, rope_theta=50000.0), "head_dim": 32, "num_key_value_heads": 2},
                    "float32", None, Rope(50000.0, RopeScaling(8.0, 1.0, 4.0, 32))),
}


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


def to_v4(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config in transformers 4.x keys, as a 4.x save_pretrained would have written it."""
    out = {k: v for k, v in cfg.items() if k != "rope_parameters"}
    params = dict(cfg["rope_parameters"])
    out["rope_theta"] = params.pop("rope_theta")
    kind = params.pop("rope_type")
    params.pop("type", None)
    if kind != "default":
        out["rope_scaling"] = {"rope_type": kind, **params}
    return out


def hf_reference(path: Path):
    model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@dataclasses.dataclass
class Saved:
    name: str
    path: Path  # the checkpoint, config.json in the form under test
    ids: np.ndarray  # (1, N_POS) int64
    ref: np.ndarray  # (1, N_POS, vocab) float32, transformers on the saved weights
    rope: Rope


@pytest.fixture(scope="module")
def saved_v5(tmp_path_factory, tokenizer_files) -> dict[str, Saved]:
    """Each case saved by transformers 5.25's save_pretrained (tokenizer files added for the GGUF writer)."""
    out: dict[str, Saved] = {}
    rng = np.random.default_rng(0)
    for i, (name, (kwargs, dtype, shard, rope)) in enumerate(CASES.items()):
        torch.manual_seed(i)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, **kwargs})).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                w = 1.0 + 0.2 * torch.randn_like(p) if p.ndim == 1 else (
                    torch.randn_like(p) if "embed_tokens" in pname else torch.randn_like(p) / p.shape[1] ** 0.5)
                p.copy_(w.half().float())  # exactly representable in F16: the F16 GGUF holds these weights
        path = tmp_path_factory.mktemp(name) / "v5"
        model.to(getattr(torch, dtype)).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
        for fname, text in tokenizer_files(VOCAB).items():
            (path / fname).write_text(text)
        cfg = json.loads((path / "config.json").read_text())
        assert "rope_parameters" in cfg and "rope_theta" not in cfg and "rope_scaling" not in cfg, cfg
        ids = rng.integers(3, VOCAB, size=(1, N_POS), dtype=np.int64)
        with torch.no_grad():
            ref = hf_reference(path)(torch.from_numpy(ids)).logits.float().numpy()
        out[name] = Saved(name, path, ids, ref, rope)
    return out


@pytest.fixture(scope="module", params=["v5", "v4"])
def saved(request, saved_v5, tmp_path_factory) -> dict[str, Saved]:
    """The checkpoints as transformers 5 wrote them, or copied with config.json in hand-written 4.x keys."""
    if request.param == "v5":
        return saved_v5
    out = {}
    for name, s in saved_v5.items():
        path = tmp_path_factory.mktemp(name) / "v4"
        shutil.copytree(s.path, path)
        cfg = to_v4(json.loads((s.path / "config.json").read_text()))
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
        # transformers itself reads the 4.x file to the same model: the reference stays valid.
        with torch.no_grad():
            ref = hf_reference(path)(torch.from_numpy(s.ids)).logits.float().numpy()
        np.testing.assert_array_equal(ref, s.ref)
        out[name] = dataclasses.replace(s, path=path)
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_qkiln_runtime_equals_transformers(saved, case):
    s = saved[case]
    ckpt = Checkpoint.open(s.path)
    assert Rope(ckpt.config.rope_theta, ckpt.config.rope_scaling) == s.rope
    ours = LlamaModel(ckpt).forward(s.ids)
    err = rel_err(ours, s.ref)
    print(f"{case}: qkiln vs transformers max rel {err:.2e}")
    assert err <= QKILN_TOL, err

    # The old reader's mistake (theta 10000, no scaling) is far outside the tolerance: this test sees it.
    tensors = {n: ckpt.tensor(n) for n in ckpt.names()}
    wrongs = [dataclasses.replace(ckpt.config, rope_theta=10000.0, rope_scaling=None)]
    if s.rope.scaling is not None:
        wrongs.append(dataclasses.replace(ckpt.config, rope_scaling=None))
    for wrong in wrongs:
        assert rel_err(LlamaModel(DictSource(wrong, tensors)).forward(s.ids), s.ref) > 100 * QKILN_TOL


@pytest.mark.llamacpp
@pytest.mark.parametrize("case", list(CASES))
def test_llamacpp_on_f16_gguf_equals_transformers(saved, case, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from qkiln.pipeline.convert import convert_to_gguf

    bench = _bench()
    s = saved[case]
    out = tmp_path / "f16.gguf"
    convert_to_gguf(s.path, out, "f16")
    llm = bench.llamacpp_model(out, ctx=128, threads=2)
    try:
        theirs = bench.llamacpp_window_logits(llm)(s.ids)
    finally:
        del llm
    err = rel_err(theirs, s.ref)
    agree = float(np.mean(theirs.argmax(-1) == s.ref.argmax(-1)))
    print(f"{case}: llama.cpp F16 vs transformers max rel {err:.2e}, top-1 {agree:.3f}")
    assert err <= LLAMACPP_TOL, err
    assert agree == 1.0, agree


def _bench():
    name = "_gguf_bench_cfg"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "bench" / "gguf_vs_llamacpp.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec and spec.loader
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules[name]
