"""The NumPy float32 Llama forward pass: the reference that calibration and evaluation run on.

Same math as transformers' `LlamaForCausalLM` (eager attention, float32): embeddings, RMSNorm, RoPE
(rotate_half, optional llama3 scaling), grouped-query causal attention, SwiGLU MLP, final norm, tied or
untied head. It runs one decoder layer at a time (`layer`) so GPTQ/AWQ can stream a checkpoint through
it with one layer's weights in memory, observing each linear's input; `forward` chains the layers.

Hot path: every matmul is one BLAS call over all tokens of the batch (q/k/v and gate/up fused when
weights are cached); attention is batched over heads on (b, kv_heads, n_rep * s, d) operands, so
grouped-query heads share their key/value matrix without a repeat() copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from qkiln.errors import CheckpointError, UserError
from qkiln.kernels import elementwise as ew
from qkiln.kernels.attention import causal_attention as fused_attention
from qkiln.model.config import LlamaConfig
from qkiln.model.names import ATTN_LINEARS, LINEARS, MLP_LINEARS, expected_shapes
from qkiln.model.source import TensorSource
from qkiln.runtime.generate import KVCache
from qkiln.runtime.rope import RopeTable

Observer = Callable[[str, np.ndarray], None]
LinearOp = Callable[[np.ndarray], np.ndarray]

def rope_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    config: LlamaConfig,
    rope: RopeTable,
    b: int,
    *,
    start_pos: int = 0,
    cache: KVCache | None = None,
    layer: int = 0,
    threads: int = 0,
    out: np.ndarray | None = None,
    precision: str = "float32",
) -> np.ndarray:
    """The attention step of a decoder layer, from projections to the o_proj input.

    q (b * s, heads * d), k and v (b * s, kv_heads * d) float32, as the q/k/v linears give them (any
    strides); RoPE at positions start_pos.., the KV cache (layer `layer`) when given, then causal
    grouped-query attention -> (b * s, heads * d). Calibration runs this same step on quantized weights.
    The attention itself is the fused C kernel (`kernels.attention`; NumPy `causal_attention` without
    the library), on `threads` threads (0: every core), written into `out` (b * s, heads * d) when given;
    precision "bfloat16" lets it use a bf16 variant, AMX or AVX512_BF16 (calibration's bf16 engine; see kernels.attention).
    """

    n_heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    s = q.shape[0] // b
    cos, sin = rope.get(start_pos, s)  # (s, d/2) each
    q4 = ew.apply_rope(q.reshape(b, s, n_heads, d), cos, sin)  # (b, s, heads, d)
    k4 = ew.apply_rope(k.reshape(b, s, kv_heads, d), cos, sin).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    v4 = v.reshape(b, s, kv_heads, d).transpose(0, 2, 1, 3)  # (b, kvh, s, d)
    if cache is not None:
        k4, v4 = cache.store(layer, start_pos, k4, v4)  # (b, kvh, start_pos + s, d) views
    return fused_attention(q4, k4, v4, threads=threads, out=out, precision=precision)


@dataclasses.dataclass
class _Layer:
    """One decoder layer's weights: norms (hidden,), linears (out, in) by short name, fused groups."""

    attn_norm: np.ndarray  # (hidden,)
    mlp_norm: np.ndarray  # (hidden,)
    linears: dict[str, np.ndarray]  # short name -> (out, in), for linears not fused and without an op
    qkv: np.ndarray | None = None  # (q_out + 2 * kv_out, hidden) when q/k/v are fused
    gate_up: np.ndarray | None = None  # (2 * inter, hidden) when gate/up are fused


class LlamaModel:
    """A Llama checkpoint run in NumPy float32, one decoder layer at a time.

    `cache_weights=True` keeps every weight after first use (evaluation); `False` reads a layer's
    tensors from `source` when the layer runs and drops them after (layer-streamed calibration, memory
    bounded by one layer). `replace_tensor` overrides are always kept.
    """

    def __init__(self, source: TensorSource, *, cache_weights: bool = True):
        self.source = source
        self.config: LlamaConfig = source.config
        self.cache_weights = cache_weights
        self._shapes = expected_shapes(self.config, with_head=True)
        self._overrides: dict[str, np.ndarray] = {}
        self._ops: dict[str, LinearOp] = {}  # module name (no ".weight") -> operator
        self._layers: dict[int, _Layer] = {}
        self._globals: dict[str, np.ndarray] = {}  # cached embed / norm / head
        self.rope = RopeTable(self.config)
        available = set(source.names())
        needed = [n for n in self._shapes if n != "lm_head.weight" or not self.config.tie_word_embeddings]
        missing = [n for n in needed if n not in available]
        if missing:
            hint = (
                " (untied head: config has tie_word_embeddings false)"
                if missing == ["lm_head.weight"]
                else ""
            )
            raise CheckpointError(
                f"checkpoint lacks {len(missing)} tensor(s) the Llama forward needs, e.g. {missing[0]}{hint}; "
                "the checkpoint is incomplete or does not match config.json"
            )

    # ---- weights -------------------------------------------------------------------------------

    def tensor(self, name: str) -> np.ndarray:
        """The current value of a tensor by HF name (override if any, else the source's), float32; do not write."""
        if name in self._overrides:
            return self._overrides[name]
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return self.tensor("model.embed_tokens.weight")
        value = self.source.tensor(name)
        want = self._shapes[name]
        if value.shape != want:
            raise CheckpointError(f"tensor {name} has shape {value.shape}, config.json implies {want}")
        return value if value.dtype == np.float32 else value.astype(np.float32)

    def replace_tensor(self, name: str, value: np.ndarray) -> None:
        """Override one tensor by full HF name (dequantized weights, AWQ-folded norms); kept until replaced again.

        With tied embeddings, replacing `model.embed_tokens.weight` changes the head too, unless
        `lm_head.weight` has been replaced on its own (then the head uses that).
        """
        if name not in self._shapes:
            raise ValueError(f"replace_tensor: {name!r} is not a tensor of this Llama model")
        arr = np.array(value, dtype=np.float32, copy=True)
        if arr.shape != self._shapes[name]:
            raise ValueError(f"replace_tensor: {name} must have shape {self._shapes[name]}, got {arr.shape}")
        arr.setflags(write=False)
        self._overrides[name] = arr
        self._invalidate(name)

    def set_linear(self, name: str, op: LinearOp | None) -> None:
        """Run a linear through `op`: x (tokens, in) float32 -> (tokens, out) float32, instead of x @ W.T.

        `name` is the module ("model.layers.3.mlp.down_proj", "lm_head"), ".weight" optional;
        `op=None` restores the dense matmul. The weight is then not read from the source at all.
        """
        module = name.removesuffix(".weight")
        if not (
            module == "lm_head"
            or (
                module.startswith("model.layers.")
                and module + ".weight" in self._shapes
                and module.endswith("_proj")
            )
        ):
            raise ValueError(f"set_linear: {name!r} is not a linear of this Llama model")
        if op is None:
            self._ops.pop(module, None)
        else:
            self._ops[module] = op
        self._invalidate(module + ".weight")

    def linear_op(self, module: str) -> LinearOp | None:
        """The operator plugged into a linear by `set_linear` (module name, ".weight" optional), or None."""
        return self._ops.get(module.removesuffix(".weight"))

    def _invalidate(self, name: str) -> None:
        if name.startswith("model.layers."):
            self._layers.pop(int(name.split(".")[2]), None)
        else:
            self._globals.clear()

    def _global(self, name: str) -> np.ndarray:
        if not self.cache_weights:
            return self.tensor(name)
        if name not in self._globals:
            self._globals[name] = self.tensor(name)
        return self._globals[name]

    def _layer_weights(self, i: int) -> _Layer:
        if i in self._layers:
            return self._layers[i]
        p = f"model.layers.{i}."
        lw = _Layer(
            attn_norm=self.tensor(p + "input_layernorm.weight"),
            mlp_norm=self.tensor(p + "post_attention_layernorm.weight"),
            linears={},
        )
        free = [s for s in LINEARS if p + s not in self._ops]
        qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        gate_up = ("mlp.gate_proj", "mlp.up_proj")
        if self.cache_weights and all(s in free for s in qkv):  # fusing costs a copy: worth it only if kept
            lw.qkv = np.concatenate([self.tensor(p + s + ".weight") for s in qkv])
            free = [s for s in free if s not in qkv]
        if self.cache_weights and all(s in free for s in gate_up):
            lw.gate_up = np.concatenate([self.tensor(p + s + ".weight") for s in gate_up])
            free = [s for s in free if s not in gate_up]
        lw.linears = {s: self.tensor(p + s + ".weight") for s in free}
        if self.cache_weights:
            self._layers[i] = lw
        return lw

    def _linear(self, module: str, x: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
        """x (t, in) -> (t, out): the plugged operator if any, else x @ W.T (one BLAS call)."""
        op = self._ops.get(module)
        if op is None:
            assert weight is not None, module
            return np.matmul(x, weight.T)
        out_features = self._shapes[module + ".weight"][0]
        y = np.asarray(op(x), dtype=np.float32)
        if y.shape != (x.shape[0], out_features):
            raise ValueError(
                f"linear op for {module} returned shape {y.shape}, expected {(x.shape[0], out_features)}"
            )
        return y

    # ---- forward -------------------------------------------------------------------------------

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (b, s) int -> embeddings (b, s, hidden) float32."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise UserError(f"token ids must be an integer array (batch, seq), got {ids.dtype} {ids.shape}")
        vocab = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise UserError(
                f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is outside the vocabulary "
                f"(0..{vocab - 1}); the tokenizer does not match this model"
            )
        return self._global("model.embed_tokens.weight")[ids]  # (b, s, hidden)

    def layer(
        self,
        i: int,
        h: np.ndarray,
        *,
        start_pos: int = 0,
        cache: KVCache | None = None,
        observer: Observer | None = None,
    ) -> np.ndarray:
        """Decoder layer i on hidden states (b, s, hidden) at positions start_pos.. -> new (b, s, hidden).

        `observer(linear_name, x)` sees each linear's input as (b * s, in) float32 before it runs;
        q/k/v share one array, as do gate/up. With `cache`, keys/values are stored at start_pos and
        attention reads every cached position before them; without, start_pos only shifts the RoPE
        positions (as transformers' `position_ids` do) and the s tokens attend among themselves.
        """
        cfg = self.config
        assert 0 <= i < cfg.num_hidden_layers, i
        h = np.asarray(h, dtype=np.float32)  # a float64 caller must not silently double the cost
        b, s, hidden = h.shape
        n_heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        p = f"model.layers.{i}."
        lw = self._layer_weights(i)
        eps = cfg.rms_norm_eps

        x = ew.rms_norm(h.reshape(b * s, hidden), lw.attn_norm, eps)  # (t, hidden)
        if observer is not None:
            for name in ATTN_LINEARS[:3]:
                observer(name, x)
        if lw.qkv is not None:
            qkv = np.matmul(x, lw.qkv.T)  # (t, q_out + 2 kv_out)
            q_out, kv_out = n_heads * d, kv_heads * d
            q, k, v = qkv[:, :q_out], qkv[:, q_out : q_out + kv_out], qkv[:, q_out + kv_out :]
        else:
            q, k, v = (self._linear(p + n, x, lw.linears.get(n)) for n in ATTN_LINEARS[:3])
        attn = rope_attention(q, k, v, cfg, self.rope, b, start_pos=start_pos, cache=cache, layer=i)  # (t, heads * d)
        if observer is not None:
            observer("self_attn.o_proj", attn)
        out = h + self._linear(p + "self_attn.o_proj", attn, lw.linears.get("self_attn.o_proj")).reshape(
            b, s, hidden
        )

        x = ew.rms_norm(out.reshape(b * s, hidden), lw.mlp_norm, eps)  # (t, hidden)
        if observer is not None:
            observer("mlp.gate_proj", x)
            observer("mlp.up_proj", x)
        if lw.gate_up is not None:
            gu = np.matmul(x, lw.gate_up.T)  # (t, 2 inter)
            gate, up = gu[:, : cfg.intermediate_size], gu[:, cfg.intermediate_size :]
        else:
            gate, up = (self._linear(p + n, x, lw.linears.get(n)) for n in MLP_LINEARS[:2])
        act = ew.silu_mul(gate, up)  # (t, inter)
        if observer is not None:
            observer("mlp.down_proj", act)
        out += self._linear(p + "mlp.down_proj", act, lw.linears.get("mlp.down_proj")).reshape(b, s, hidden)
        return out

    def head(self, h: np.ndarray) -> np.ndarray:
        """Final RMSNorm and lm_head: (b, s, hidden) -> logits (b, s, vocab) float32."""
        b, s, hidden = h.shape
        x = ew.rms_norm(h.reshape(b * s, hidden), self._global("model.norm.weight"), self.config.rms_norm_eps)
        w = None if "lm_head" in self._ops else self._global("lm_head.weight")
        return self._linear("lm_head", x, w).reshape(b, s, -1)

    def hidden(self, ids: np.ndarray, *, start_pos: int = 0, cache: KVCache | None = None) -> np.ndarray:
        """Hidden states after the last decoder layer, before the final norm: (b, s) -> (b, s, hidden)."""
        h = self.embed(ids)
        for i in range(self.config.num_hidden_layers):
            h = self.layer(i, h, start_pos=start_pos, cache=cache)
        return h

    def forward(self, ids: np.ndarray, *, start_pos: int = 0, cache: KVCache | None = None) -> np.ndarray:
        """Logits (b, s, vocab) float32 for token ids (b, s) at positions start_pos..start_pos+s-1."""
        return self.head(self.hidden(ids, start_pos=start_pos, cache=cache))

    __call__ = forward
