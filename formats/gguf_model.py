"""A llama GGUF opened as a runnable model: linears run on their own packed blocks through the C kernels.

`load_gguf_model(path)` -> `runtime.load.LoadedModel`: linears whose ggml type has a kernel (Q4_0, Q8_0,
Q5_0, Q4_1, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: `kernels.types.BLOCK`) stay packed — q/k rows put back in Hugging Face order by moving whole rows of blocks, which is
exact — and everything else (norms, embeddings, other types) is dequantized with gguf-py as the importer does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tokenizers

from qkiln.formats.gguf_import import config_from_gguf, dequantize_tensor
from qkiln.formats.gguf_read import read_gguf
from qkiln.formats.tokenizer_gguf import tokenizer_files
from qkiln.kernels.linear import BLOCK, KERNEL_TYPES, PackedLinear, fuse_shared_inputs, plug_packed_linears
from qkiln.kernels.types import WType
from qkiln.model.names import GGUF_DERIVED, gguf_to_hf_name, is_k_proj, is_q_proj, unpermute_qk
from qkiln.runtime.llama import LlamaModel
from qkiln.runtime.load import LoadedModel


def _rows(t) -> np.ndarray:
    """A GGUF tensor's bytes as (out rows, bytes per row) uint8."""
    return np.asarray(t.data, dtype=np.uint8).reshape(t.shape[0], -1)


class GGUFSource:
    """TensorSource over a llama GGUF: dequantizes on request (only what is not packed is ever asked)."""

    def __init__(self, f, config):
        self.config = config
        self._f = f
        self._by_hf = {gguf_to_hf_name(n, config.num_hidden_layers): n for n in f.tensors if n not in GGUF_DERIVED}

    def names(self) -> list[str]:
        return list(self._by_hf)

    def gguf_tensor(self, hf_name: str):
        return self._f.tensors[self._by_hf[hf_name]]

    def tensor(self, name: str) -> np.ndarray:
        w = dequantize_tensor(self._f, self.gguf_tensor(name))
        if is_q_proj(name):
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif is_k_proj(name):
            w = unpermute_qk(w, self.config.num_attention_heads, self.config.num_key_value_heads)
        return w


def packed_linears_from_gguf(source: GGUFSource, nthreads: int | None = None) -> dict[str, PackedLinear]:
    """A PackedLinear per linear (and the head, tied or not) whose ggml type has a kernel."""
    cfg = source.config
    out: dict[str, PackedLinear] = {}
    names = [n for n in source.names() if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    head = "lm_head.weight" if "lm_head.weight" in source.names() else "model.embed_tokens.weight"
    for name in [*names, head]:
        t = source.gguf_tensor(name)
        if int(t.ggml_type) not in KERNEL_TYPES or t.shape[1] % BLOCK[WType(int(t.ggml_type))][0]:
            continue
        rows = _rows(t)  # (out, row bytes): moving whole rows is exact for any block type
        if is_q_proj(name):
            rows = unpermute_qk(rows, cfg.num_attention_heads)
        elif is_k_proj(name):
            rows = unpermute_qk(rows, cfg.num_attention_heads, cfg.num_key_value_heads)
        module = "lm_head" if name == head else name.removesuffix(".weight")
        out[module] = PackedLinear(WType(int(t.ggml_type)), np.ascontiguousarray(rows).reshape(-1),
                                   t.shape[0], t.shape[1], nthreads)
    return out


def load_gguf_model(path: str | Path, nthreads: int | None = None):
    """A `runtime.load.LoadedModel` running a llama GGUF on packed weights (C kernels, else NumPy)."""
    f = read_gguf(path)
    cfg = config_from_gguf(f)
    source = GGUFSource(f, cfg)
    model = LlamaModel(source)
    plug_packed_linears(model, fuse_shared_inputs(packed_linears_from_gguf(source, nthreads)))
    tok = tokenizers.Tokenizer.from_str(
        tokenizer_files(f.metadata, where=str(path), model_max_length=cfg.max_position_embeddings)["tokenizer.json"])
    return LoadedModel(path=Path(path), model=model, tokenizer=tok)
