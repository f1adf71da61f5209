"""Llama tensor names in Hugging Face and GGUF spelling, their shapes, and llama.cpp's q/k rotary permutation.

The one table of a Llama's tensors: the runtime, the quantizers (AWQ's input groups, the calibrated
output order), the readers and the writers all take their names from here.

The GGUF names come from gguf-py's `TensorNameMap` (the table llama.cpp's converter uses), so a rename
upstream follows automatically; only the Hugging Face side is spelled out here, because that is
transformers' `LlamaForCausalLM` layout and gguf-py maps many architectures' names onto one GGUF name.

Rotary layout: transformers' Llama applies RoPE with `rotate_half`, pairing dimension i with
i + head_dim/2 inside each head. ggml's RoPE (mode 0) pairs adjacent dimensions (2i, 2i+1). llama.cpp's
converter therefore reorders the output rows of q_proj and k_proj per head so that the pairs become
adjacent; `permute_qk` does that, `unpermute_qk` undoes it exactly (both are pure row reorderings).
Used by the GGUF importer (GGUF -> HF) and the GGUF writer (HF -> GGUF).
"""

from __future__ import annotations

import functools

import numpy as np
from gguf.constants import MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES
from gguf.tensor_mapping import TensorNameMap

from qkiln.model.config import LlamaConfig

# transformers' LlamaForCausalLM module names (without ".weight"); {bid} is the layer index.
HF_GLOBAL = ("model.embed_tokens", "model.norm", "lm_head")
HF_PER_LAYER = (
    "model.layers.{bid}.input_layernorm",
    "model.layers.{bid}.self_attn.q_proj",
    "model.layers.{bid}.self_attn.k_proj",
    "model.layers.{bid}.self_attn.v_proj",
    "model.layers.{bid}.self_attn.o_proj",
    "model.layers.{bid}.post_attention_layernorm",
    "model.layers.{bid}.mlp.gate_proj",
    "model.layers.{bid}.mlp.up_proj",
    "model.layers.{bid}.mlp.down_proj",
)

# A decoder layer's linears grouped by the input they share (AWQ folds a scale into the op before each group;
# calibration stops at each group), in the order the layer runs them.
INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
ATTN_LINEARS = (*INPUT_GROUPS["attn_in"], *INPUT_GROUPS["attn_out"])
MLP_LINEARS = (*INPUT_GROUPS["mlp_in"], *INPUT_GROUPS["mlp_out"])
LINEARS: tuple[str, ...] = ATTN_LINEARS + MLP_LINEARS
GROUP_OF: dict[str, str] = {n: g for g, names in INPUT_GROUPS.items() for n in names}
NORMS = ("input_layernorm", "post_attention_layernorm")


def expected_shapes(config: LlamaConfig, *, with_head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama with this config, HF name -> shape (out x in), in checkpoint order.

    `lm_head.weight` is listed when embeddings are not tied (a tied checkpoint reuses
    `model.embed_tokens.weight` and usually does not store it), or always with `with_head=True` (what the
    forward pass reads)."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    per_layer = {
        "input_layernorm": (h,),
        "self_attn.q_proj": (q_out, h),
        "self_attn.k_proj": (kv_out, h),
        "self_attn.v_proj": (kv_out, h),
        "self_attn.o_proj": (h, q_out),
        "post_attention_layernorm": (h,),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    assert [f"model.layers.{{bid}}.{n}" for n in per_layer] == list(HF_PER_LAYER)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(config.num_hidden_layers):
        shapes.update({f"model.layers.{i}.{n}.weight": shape for n, shape in per_layer.items()})
    shapes["model.norm.weight"] = (h,)
    if with_head or (with_head is None and not config.tie_word_embeddings):
        shapes["lm_head.weight"] = (vocab, h)
    return shapes


# GGUF tensors that carry no weights of their own in HF (derived from config.json there).
# rope_freqs holds llama3 rope-scaling factors that HF recomputes from config.json's rope_scaling.
GGUF_DERIVED = frozenset({f"{TENSOR_NAMES[MODEL_TENSOR.ROPE_FREQS]}.weight"})


def hf_modules(n_layers: int) -> list[str]:
    """Every HF module name of an `n_layers` Llama, globals first, then layer by layer."""
    return [*HF_GLOBAL, *(p.format(bid=i) for i in range(n_layers) for p in HF_PER_LAYER)]


@functools.lru_cache(maxsize=8)
def _name_maps(n_layers: int) -> tuple[dict[str, str], dict[str, str]]:
    tmap = TensorNameMap(MODEL_ARCH.LLAMA, n_layers)
    allowed = set(MODEL_TENSORS[MODEL_ARCH.LLAMA])
    hf_to_gguf: dict[str, str] = {}
    for module in hf_modules(n_layers):
        found = tmap.get_type_and_name(module)
        assert found is not None and found[0] in allowed, f"gguf-py has no llama tensor for {module}"
        hf_to_gguf[f"{module}.weight"] = f"{found[1]}.weight"
    return hf_to_gguf, {g: h for h, g in hf_to_gguf.items()}


def hf_to_gguf_name(hf_name: str, n_layers: int) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; KeyError if not a Llama weight."""
    return _name_maps(n_layers)[0][hf_name]


def gguf_to_hf_name(gguf_name: str, n_layers: int) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; KeyError if not a Llama weight."""
    return _name_maps(n_layers)[1][gguf_name]


def is_q_proj(hf_name: str) -> bool:
    return hf_name.endswith("self_attn.q_proj.weight")


def is_k_proj(hf_name: str) -> bool:
    return hf_name.endswith("self_attn.k_proj.weight")


def _heads(w: np.ndarray, n_head: int, n_head_kv: int | None) -> int:
    """Heads of the tensor being permuted: q uses n_head, k (GQA) n_head_kv, as llama.cpp's converter."""
    heads = n_head_kv if n_head_kv is not None and n_head_kv != n_head else n_head
    if w.shape[0] % (2 * heads):
        raise ValueError(f"{w.shape[0]} rows do not split into {heads} heads of an even size")
    return heads


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF rotate_half row order -> GGML interleaved pairs (llama.cpp's `permute(w, n_head, n_head_kv)`).

    w: (heads * head_dim, ...) for q (pass n_head) or k (pass n_head and n_head_kv). Within each head,
    row j < head_dim/2 moves to 2j and row head_dim/2 + j to 2j + 1. Returns a new array.
    """
    heads = _heads(w, n_head, n_head_kv)
    half = w.shape[0] // heads // 2
    # (heads, 2, half, ...) -> (heads, half, 2, ...): the two halves become adjacent pairs
    return np.ascontiguousarray(w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """The exact inverse of `permute_qk`: GGML interleaved pairs -> HF rotate_half row order."""
    heads = _heads(w, n_head, n_head_kv)
    half = w.shape[0] // heads // 2
    # (heads, half, 2, ...) -> (heads, 2, half, ...)
    return np.ascontiguousarray(w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))
