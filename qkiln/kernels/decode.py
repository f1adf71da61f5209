"""One decode step in C: a token through every layer of a model whose linears are packed, in one call.

`DecodeStep.for_model(model, cache)` looks at the model's plugged linears (PackedLinear, or members of a
FusedPacked for q/k/v and gate/up) and, when every linear of every layer is packed, describes the whole model
to `qk_decode_token` once (weight pointers, norms, the KV cache's arrays); `step(token, pos)` then runs
RMSNorm, activation quantization, the products, RoPE, the cache write, attention over the cache, SwiGLU and
the residuals in C and returns the logits. The NumPy runtime (runtime/llama.py) remains the definition: the
step follows it operation by operation and tests hold it to the same logits and greedy text.

Returns None (callers keep the NumPy runtime) on the NumPy path, for dense or unpacked linears, batch > 1.
"""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from qkiln.errors import UserError
from qkiln.kernels import api
from qkiln.kernels.linear import FusedMember, PackedLinear

_c_int, _c_float, _vp = ctypes.c_int, ctypes.c_float, ctypes.c_void_p


class _Lin(ctypes.Structure):
    _fields_ = [("wtype", _c_int), ("N", _c_int), ("K", _c_int), ("group", _c_int), ("w", _vp)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _vp), ("mlp_norm", _vp), ("attn_in", _Lin * 3), ("n_attn_in", _c_int), ("o", _Lin),
                ("mlp_in", _Lin * 2), ("n_mlp_in", _c_int), ("down", _Lin), ("k_cache", _vp), ("v_cache", _vp)]


class _Decoder(ctypes.Structure):
    _fields_ = [("n_layers", _c_int), ("hidden", _c_int), ("n_heads", _c_int), ("kv_heads", _c_int),
                ("head_dim", _c_int), ("inter", _c_int), ("vocab", _c_int), ("max_len", _c_int), ("eps", _c_float),
                ("nthreads", _c_int), ("layers", ctypes.POINTER(_Layer)), ("final_norm", _vp), ("head", _Lin)]


def _lin(op: PackedLinear) -> _Lin:
    return _Lin(int(op._run_type), op.out_features, op.in_features, 0, op._run_data.ctypes.data)


def _shared_input(ops: list[Any]) -> list[PackedLinear] | None:
    """The packed matrices computing these linears (in order) from one input: the FusedPacked they are all
    members of (one matrix), or each one's own PackedLinear; None if any is something else."""
    if all(isinstance(o, FusedMember) for o in ops):
        fused = ops[0].fused
        if all(o.fused is fused for o in ops) and [o.index for o in ops] == list(range(len(ops))) \
                and len(fused.names) == len(ops):
            return [fused.linear]
        return None
    if all(isinstance(o, PackedLinear) for o in ops):
        return list(ops)
    return None


class DecodeStep:
    """The C decode step bound to one model and one KV cache (see the module docstring)."""

    def __init__(self, model: Any, cache: Any, layers: list[tuple], head: PackedLinear | None, nthreads: int):
        cfg = model.config
        self.model, self.cache = model, cache
        self._keep: list[np.ndarray] = []
        descs = (_Layer * cfg.num_hidden_layers)()
        for i, (attn_norm, mlp_norm, attn_in, o, mlp_in, down) in enumerate(layers):
            L = descs[i]
            L.attn_norm, L.mlp_norm = self._ptr(attn_norm), self._ptr(mlp_norm)
            for j, op in enumerate(attn_in):
                L.attn_in[j] = _lin(op)
            L.n_attn_in = len(attn_in)
            L.o = _lin(o)
            for j, op in enumerate(mlp_in):
                L.mlp_in[j] = _lin(op)
            L.n_mlp_in = len(mlp_in)
            L.down = _lin(down)
            for kv in (cache.k[i], cache.v[i]):  # written in place: must be the cache's own arrays
                assert kv.dtype == np.float32 and kv.flags.c_contiguous and kv.shape[0] == 1
            L.k_cache, L.v_cache = cache.k[i].ctypes.data, cache.v[i].ctypes.data
        self._layers = descs
        self._ops = [op for entry in layers for op in (*entry[2], entry[3], *entry[4], entry[5])]  # keep alive
        self._head = head
        d = _Decoder(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                     cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cache.max_len, float(np.float32(cfg.rms_norm_eps)),
                     nthreads, ctypes.cast(descs, ctypes.POINTER(_Layer)), None, _Lin(0, 0, 0, 0, None))
        if head is not None:
            d.final_norm = self._ptr(model.tensor("model.norm.weight"))
            d.head = _lin(head)
        self._desc = d
        self._h = np.empty(cfg.hidden_size, np.float32)  # (hidden,)
        self._logits = np.empty(cfg.vocab_size, np.float32)  # (vocab,)
        self._fn = api._lib.qk_decode_token
        self._fn.restype = _c_int
        self._fn.argtypes = [ctypes.POINTER(_Decoder), _vp, _c_int, _vp, _vp, _vp]

    def _ptr(self, a: np.ndarray) -> int:
        a = np.ascontiguousarray(a, np.float32)
        self._keep.append(a)
        return a.ctypes.data

    @classmethod
    def for_model(cls, model: Any, cache: Any, nthreads: int | None = None) -> DecodeStep | None:
        """A step for `model` writing into `cache`, or None when the model cannot run it (see module doc).
        `nthreads` defaults to the thread count the model's packed linears were made with (None: every core)."""
        if api.kernel_path() == "numpy" or api._lib is None or cache.batch != 1:
            return None
        op_of = getattr(model, "linear_op", None)  # LlamaModel's plugged linears
        if op_of is None:
            return None
        cfg = model.config
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            attn_in = _shared_input([op_of(p + n) for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")])
            mlp_in = _shared_input([op_of(p + n) for n in ("mlp.gate_proj", "mlp.up_proj")])
            o, down = op_of(p + "self_attn.o_proj"), op_of(p + "mlp.down_proj")
            if attn_in is None or mlp_in is None or not isinstance(o, PackedLinear) or not isinstance(down, PackedLinear):
                return None
            layers.append((model.tensor(p + "input_layernorm.weight"), model.tensor(p + "post_attention_layernorm.weight"),
                           attn_in, o, mlp_in, down))
        head = op_of("lm_head")
        if nthreads is None:  # as the model's packed linears were loaded (load_gguf_model(nthreads=...))
            nthreads = layers[0][3].nthreads if layers else None
        threads = 0 if nthreads is None else int(nthreads)
        return cls(model, cache, layers, head if isinstance(head, PackedLinear) else None, threads)

    def __call__(self, token: int, pos: int) -> np.ndarray:
        """Logits (vocab,) float32 after the token at position `pos` (a view reused by the next call)."""
        cache = self.cache
        if pos > cache.length:
            raise UserError(f"decode step at position {pos} skips positions (cache filled to {cache.length})")
        if pos >= cache.max_len:
            raise UserError(f"KV cache holds {cache.max_len} positions, {pos + 1} needed; make a longer cache")
        np.copyto(self._h, self.model.embed(np.array([[token]], np.int64))[0, 0])
        cos, sin = self.model.rope.get(pos, 1)  # (1, head_dim/2) each, contiguous rows
        logits = self._logits.ctypes.data if self._head is not None else None
        if self._fn(ctypes.byref(self._desc), self._h.ctypes.data, pos, cos.ctypes.data, sin.ctypes.data, logits) != 0:
            raise ValueError("qk_decode_token rejected the model description")
        cache.lengths = [pos + 1] * len(cache.lengths)
        if self._head is None:
            return self.model.head(self._h.reshape(1, 1, -1))[0, 0]
        return self._logits
