"""A Llama decoder as an ONNX graph onnxruntime-genai runs, built one decoder layer at a time.

The graph is the one onnxruntime-genai's model builder emits for Llama on CPU (its compatibility target):
  inputs   input_ids int64 (batch, seq), attention_mask int64 (batch, total_seq),
           past_key_values.%d.key / .value float32 (batch, kv_heads, past_seq, head_dim)     (BNSH)
  outputs  logits float32 (batch, seq, vocab), present.%d.key / .value (batch, kv_heads, total_seq, head_dim)
  per layer: RMSNorm → one packed q/k/v MatMulNBits → GroupQueryAttention (rotary inside, cos/sin caches
  as initializers, seqlens_k / total_seq_len from the attention mask) → o_proj → SkipSimplifiedLayerNorm
  (adds the residual) → gate/up MatMulNBits → SiLU as Sigmoid·Mul → · up → down_proj; the next layer's
  SkipSimplifiedLayerNorm adds the residual again; the final one feeds lm_head.
Opsets {"": 22, "com.microsoft": 1}, IR version 10 (onnx 1.23 would write 14; onnxruntime takes ≤ 13).

One difference, on purpose: the builder's first norm is `SimplifiedLayerNormalization` in the default
domain, an op ORT registers there but ONNX does not define, so `onnx.checker` rejects the builder's graph.
qkiln writes that one norm (the only one without a residual to add) in standard ops —
Pow, ReduceMean, Add, Sqrt, Div, Mul — which ONNX Runtime fuses into the same kernel when it loads.

Initializers go to one external data file as they are produced (`ExternalData`), so memory holds one
layer's packed weights, never the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, TypeAlias

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qkiln.formats.onnx_pack import NBitsWeight, concat_rows, pack_nbits, same_layout
from qkiln.model.config import LlamaConfig
from qkiln.quantize.tensor import QuantizedTensor
from qkiln.runtime.rope import inv_frequencies

IR_VERSION = 10
OPSETS = {"": 22, "com.microsoft": 1}
INLINE_BYTES = 256  # tensors up to this size stay inside model.onnx (shape constants)
ALIGN_LARGE = 4096  # tensors of at least LARGE bytes start on a page boundary (ORT can map them)
LARGE = 1 << 16
ALIGN = 64
FLOAT_DTYPES = {"fp32": np.float32, "fp16": np.float16}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)

Weight: TypeAlias = QuantizedTensor | np.ndarray


@dataclasses.dataclass(frozen=True)
class GraphOptions:
    """What the recipe decides about the graph.

    float_dtype     storage of the float tensors (embedding table, norms, linears kept in float): fp32 | fp16;
                    activations are float32 either way (ORT's CPU kernels)
    accuracy_level  MatMulNBits' activation precision: 0 = A's type (float32), 4 = int8 (KleidiAI on Arm,
                    the fast path on x86); 1-3 are fp32/fp16/bf16
    context_length  positions the rotary caches cover (default: the config's max_position_embeddings)
    """

    float_dtype: str = "fp32"
    accuracy_level: int = 4
    context_length: int | None = None


class ExternalData:
    """Initializers appended to one file as they are produced; the TensorProtos only point into it."""

    def __init__(self, f: IO[bytes], location: str):
        self._f, self.location, self.offset = f, location, 0

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_BYTES:
            return numpy_helper.from_array(arr, name)
        align = ALIGN_LARGE if arr.nbytes >= LARGE else ALIGN
        pad = -self.offset % align
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self._f.write(arr.tobytes())
        self.offset += arr.nbytes
        return t


def _is_quantized(w: Weight) -> bool:
    return isinstance(w, QuantizedTensor)


class LlamaGraph:
    """Nodes and initializers of the decoder, added in the quantizer's order (embeddings, layers, head)."""

    def __init__(self, config: LlamaConfig, data: ExternalData, options: GraphOptions):
        if options.float_dtype not in FLOAT_DTYPES:
            raise ValueError(f"float_dtype {options.float_dtype!r}")
        self.cfg, self.data, self.opt = config, data, options
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.stats: dict[str, int] = {"quantized_bytes": 0, "float_bytes": 0}
        self.kinds: dict[str, str] = {}  # HF name -> how it is stored (for inspect)
        self._head: str | None = None  # logits producer, set when lm_head is known
        self._residual = ""  # running residual sum's name
        self._pending = ""  # output of the last sublayer, not yet added to the residual
        # linears whose initializers are written but whose node waits for its input (base -> node parts)
        self._deferred: dict[str, tuple[str, list[str], str, dict[str, object], str | None]] = {}
        self._begin()

    # ---- helpers -------------------------------------------------------------------------------

    def _init(self, name: str, arr: np.ndarray, *, quantized: bool = False) -> str:
        self.inits.append(self.data.tensor(name, arr))
        self.stats["quantized_bytes" if quantized else "float_bytes"] += int(arr.nbytes)
        return name

    def _node(self, op: str, inputs: list[str], outputs: list[str] | None = None, *, name: str,
              domain: str = "", **attrs: Any) -> str:
        outs = outputs if outputs is not None else [f"{name}/output_0"]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs[0]

    def _float(self, name: str, arr: np.ndarray) -> str:
        """A float initializer in the storage dtype, as float32 for the graph (a Cast ORT folds at load)."""
        dtype = FLOAT_DTYPES[self.opt.float_dtype]
        stored = self._init(name, np.asarray(arr, dtype=dtype))
        if dtype == np.float32:
            return stored
        return self._node("Cast", [stored], name=f"{name}/Cast", to=TensorProto.FLOAT)

    def _const(self, name: str, arr: np.ndarray) -> str:
        return self._init(f"/model/constants/{name}", np.asarray(arr))

    # ---- graph parts ---------------------------------------------------------------------------

    def _begin(self) -> None:
        """Attention-mask subgraph (seqlens_k, total_seq_len) and the rotary caches."""

        cfg = self.cfg
        one = self._const("INT64/[1]", np.array([1], np.int64))
        self._const("INT64/1", np.array(1, np.int64))
        base = "/model/attn_mask_reformat/attn_mask_subgraph"
        rs = self._node("ReduceSum", ["attention_mask", one], name=f"{base}/ReduceSum", keepdims=0)
        sub = self._node("Sub", [rs, one], name=f"{base}/Sub")
        self.seqlens_k = self._node("Cast", [sub], name=f"{base}/Sub/Cast", to=TensorProto.INT32)
        shape = self._node("Shape", ["attention_mask"], name=f"{base}/Shape")
        total = self._node("Gather", [shape, "/model/constants/INT64/1"], name=f"{base}/Gather", axis=0)
        self.total_seq_len = self._node("Cast", [total], name=f"{base}/Gather/Cast", to=TensorProto.INT32)

        n_pos = self.opt.context_length or cfg.max_position_embeddings
        inv = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)  # (head_dim/2,) — the runtime's
        angles = np.arange(n_pos, dtype=np.float32)[:, None] * inv[None, :]  # (n_pos, head_dim/2) float32
        self.cos = self._init("cos_cache", np.cos(angles).astype(np.float32))
        self.sin = self._init("sin_cache", np.sin(angles).astype(np.float32))
        self.context_length = n_pos

    def embeddings(self, table: Weight, *, tied_head: bool) -> None:
        """The token table. Tied and quantized (what the builder does by default for a tied model): the head's
        MatMulNBits codes are written once and the embedding gathers rows of them with
        `GatherBlockQuantized` — the same weights for both, no float table. Otherwise a float Gather (a
        quantized untied table is stored dequantized, exactly)."""
        name = "model.embed_tokens.weight"
        if tied_head and isinstance(table, QuantizedTensor):
            packed = pack_nbits(table)
            self._linear("/lm_head/MatMul", "lm_head.weight", packed, "logits")
            b, scales, *zeros = self._deferred["/lm_head/MatMul"][1][1:]
            flat = packed.b.shape[1] * packed.b.shape[2]
            shape = self._const(f"INT64/[{packed.n}, {flat}]", np.array([packed.n, flat], np.int64))
            rows = self._node("Reshape", [b, shape], name="/model/embed_tokens/Reshape")
            out = self._node("GatherBlockQuantized", [rows, "input_ids", scales, *zeros],
                             name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                             bits=packed.bits, block_size=packed.block, gather_axis=0, quantize_axis=1)
            if packed.b.shape[1] * packed.block != packed.k:  # a padded last block: slice it off
                starts = self._const("INT64/[0]", np.array([0], np.int64))
                ends = self._const(f"INT64/[{packed.k}]", np.array([packed.k], np.int64))
                axes = self._const("INT64/[-1]", np.array([-1], np.int64))
                out = self._node("Slice", [out, starts, ends, axes], name="/model/embed_tokens/Slice")
            self._residual = out
            self.kinds[name] = f"GatherBlockQuantized (tied: the lm_head's {packed.bits}-bit codes)"
            self._head = "/lm_head/MatMul"
            return
        dense = table.dequantize() if isinstance(table, QuantizedTensor) else np.asarray(table, np.float32)
        self.kinds[name] = f"Gather {self.opt.float_dtype}" + (" (dequantized)" if _is_quantized(table) else "")
        rows = self._float("model.embed_tokens.weight", dense)
        del dense
        self._residual = self._node("Gather", [rows, "input_ids"], name="/model/embed_tokens/Gather", axis=0)
        if tied_head:  # a float tied head: its own (K, N) copy for the MatMul
            self._head = self._linear("/lm_head/MatMul", "lm_head.weight", table, "logits")

    def _linear(self, base: str, hf_name: str, w: Weight | NBitsWeight, out: str | None = None,
                x: str = "") -> str:
        """Initializers for one linear now; the node is added when its input `x` is known (`_apply`)."""
        if isinstance(w, QuantizedTensor):
            w = pack_nbits(w)
        if isinstance(w, NBitsWeight):
            tag = f"Q{w.bits}G{w.block}"
            inputs = [x, self._init(f"{base}.weight_{tag}", w.b, quantized=True),
                      self._init(f"{base}.weight_scale", w.scales, quantized=True)]
            if w.zeros is not None:
                inputs.append(self._init(f"{base}.weight_zp", w.zeros, quantized=True))
            self.kinds[hf_name] = f"MatMulNBits {w.bits}-bit block {w.block}" + (" zero points" if w.zeros is not None else "")
            attrs = {"K": w.k, "N": w.n, "bits": w.bits, "block_size": w.block, "accuracy_level": self.opt.accuracy_level}
            self._deferred[base] = ("MatMulNBits", inputs, "com.microsoft", attrs, out)
        else:
            wt = np.ascontiguousarray(np.asarray(w, np.float32).T)  # (K, N)
            self.kinds[hf_name] = f"MatMul {self.opt.float_dtype}"
            self._deferred[base] = ("MatMul", [x, self._float(f"{base}.weight", wt)], "", {}, out)
        return base

    def _apply(self, base: str, x: str) -> str:
        op, inputs, domain, attrs, out = self._deferred.pop(base)
        return self._node(op, [x, *inputs[1:]], [out] if out else None, name=f"{base}{'NBits' if op == 'MatMulNBits' else ''}",
                          domain=domain, **attrs)

    def _rms_norm_plain(self, base: str, x: str, weight: str) -> str:
        """RMSNorm in standard ONNX ops (ORT fuses them into SimplifiedLayerNormalization)."""
        two = self._const("FLOAT/2", np.array(2.0, np.float32))
        eps = self._const(f"FLOAT/{self.cfg.rms_norm_eps!r}", np.array(self.cfg.rms_norm_eps, np.float32))
        axes = self._const("INT64/[-1]", np.array([-1], np.int64))
        sq = self._node("Pow", [x, two], name=f"{base}/Pow")
        mean = self._node("ReduceMean", [sq, axes], name=f"{base}/ReduceMean", keepdims=1)
        add = self._node("Add", [mean, eps], name=f"{base}/Add")
        root = self._node("Sqrt", [add], name=f"{base}/Sqrt")
        div = self._node("Div", [x, root], name=f"{base}/Div")
        return self._node("Mul", [div, weight], name=f"{base}/Mul")

    def _norm(self, base: str, weight: str) -> str:
        """Normalize the pending sublayer output plus the residual (or the embeddings at the start)."""
        if not self._pending:
            return self._rms_norm_plain(base, self._residual, weight)
        name = f"{base}/SkipLayerNorm"
        outs = [f"{name}/output_0", "", "", f"{name}/output_3"]
        self._node("SkipSimplifiedLayerNormalization", [self._pending, self._residual, weight], outs, name=name,
                   domain="com.microsoft", epsilon=float(self.cfg.rms_norm_eps))
        self._residual, self._pending = outs[3], ""
        return outs[0]

    def layer(self, i: int, w: dict[str, Weight]) -> None:
        """Decoder layer `i` from its tensors by short name (`self_attn.q_proj`, ..., `input_layernorm`)."""
        cfg = self.cfg
        p = f"/model/layers.{i}"
        hf = f"model.layers.{i}."
        ln1 = self._float(f"model.layers.{i}.input_layernorm.weight", w["input_layernorm"])
        ln2 = self._float(f"model.layers.{i}.post_attention_layernorm.weight", w["post_attention_layernorm"])
        self.kinds[hf + "input_layernorm.weight"] = self.kinds[hf + "post_attention_layernorm.weight"] = self.opt.float_dtype
        x = self._norm(f"{p}/input_layernorm", ln1)

        qkv = [w[f"self_attn.{n}_proj"] for n in "qkv"]
        packed = [pack_nbits(t) if isinstance(t, QuantizedTensor) else None for t in qkv]
        if all(pk is not None for pk in packed) and same_layout(packed):  # type: ignore[arg-type]
            fused = concat_rows(packed)  # type: ignore[arg-type]
            self._linear(f"{p}/attn/qkv_proj/MatMul", hf + "self_attn.qkv_proj.weight", fused)
            for n in "qkv":
                self.kinds[hf + f"self_attn.{n}_proj.weight"] = self.kinds[hf + "self_attn.qkv_proj.weight"] + " (packed q/k/v)"
            del self.kinds[hf + "self_attn.qkv_proj.weight"]
            q_in = [self._apply(f"{p}/attn/qkv_proj/MatMul", x), "", ""]
        else:
            q_in = []
            for n, t, pk in zip("qkv", qkv, packed, strict=True):
                self._linear(f"{p}/attn/{n}_proj/MatMul", hf + f"self_attn.{n}_proj.weight", pk if pk is not None else t)
                q_in.append(self._apply(f"{p}/attn/{n}_proj/MatMul", x))
        del qkv, packed
        gqa = f"{p}/attn/GroupQueryAttention"
        attn = self._node(
            "GroupQueryAttention",
            [*q_in, f"past_key_values.{i}.key", f"past_key_values.{i}.value", self.seqlens_k, self.total_seq_len,
             self.cos, self.sin],
            [f"{gqa}/output_0", f"present.{i}.key", f"present.{i}.value"], name=gqa, domain="com.microsoft",
            num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
            scale=float(1.0 / np.sqrt(cfg.head_dim)), local_window_size=-1, softcap=0.0, do_rotary=1,
            rotary_interleaved=0,
        )
        self._linear(f"{p}/attn/o_proj/MatMul", hf + "self_attn.o_proj.weight", w["self_attn.o_proj"])
        self._pending = self._apply(f"{p}/attn/o_proj/MatMul", attn)
        x = self._norm(f"{p}/post_attention_layernorm", ln2)

        self._linear(f"{p}/mlp/gate_proj/MatMul", hf + "mlp.gate_proj.weight", w["mlp.gate_proj"])
        self._linear(f"{p}/mlp/up_proj/MatMul", hf + "mlp.up_proj.weight", w["mlp.up_proj"])
        gate = self._apply(f"{p}/mlp/gate_proj/MatMul", x)
        up = self._apply(f"{p}/mlp/up_proj/MatMul", x)
        sig = self._node("Sigmoid", [gate], name=f"{p}/mlp/act_fn/Sigmoid")
        silu = self._node("Mul", [gate, sig], name=f"{p}/mlp/act_fn/Mul")
        h = self._node("Mul", [silu, up], name=f"{p}/mlp/Mul")
        self._linear(f"{p}/mlp/down_proj/MatMul", hf + "mlp.down_proj.weight", w["mlp.down_proj"])
        self._pending = self._apply(f"{p}/mlp/down_proj/MatMul", h)

    def final(self, norm: np.ndarray, head: Weight | None) -> None:
        """The final norm and lm_head (`head` None: tied, already added with the embeddings)."""
        weight = self._float("model.norm.weight", norm)
        self.kinds["model.norm.weight"] = self.opt.float_dtype
        x = self._norm("/model/layers.final_norm_layernorm", weight)
        if head is not None:
            self._linear("/lm_head/MatMul", "lm_head.weight", head, "logits")
        elif self._head is None:
            raise AssertionError("tied head without embeddings")
        else:
            self.kinds["lm_head.weight"] = self.kinds["lm_head.weight"] + " (tied: embedding codes)"
        self._apply("/lm_head/MatMul", x)

    def model(self, metadata: dict[str, str]) -> onnx.ModelProto:
        cfg = self.cfg
        kv = ["batch_size", cfg.num_key_value_heads, "past_sequence_length", cfg.head_dim]
        present = ["batch_size", cfg.num_key_value_heads, "total_sequence_length", cfg.head_dim]
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", cfg.vocab_size])]
        for i in range(cfg.num_hidden_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present))
        graph = helper.make_graph(self.nodes, "main_graph", inputs, outputs, initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()],
                                  ir_version=IR_VERSION, producer_name="qkiln")
        helper.set_model_props(model, dict(sorted(metadata.items())))
        return model


def write_model(dest: Path, config: LlamaConfig, tensors: object, options: GraphOptions,
                metadata: dict[str, str], *, data_name: str = "model.onnx.data") -> LlamaGraph:
    """Write `dest/model.onnx` and `dest/<data_name>` from the quantizer's stream of (hf_name, weight),
    in its order: embeddings, then layer by layer (linears and norms), model.norm, lm_head when untied.

    Holds one layer's tensors at a time (the tied head's packed codes are written at once, with the
    embeddings)."""
    assert isinstance(tensors, Iterable)
    it = iter(tensors)
    n_layers = config.num_hidden_layers
    with open(dest / data_name, "wb") as f:
        graph = LlamaGraph(config, ExternalData(f, data_name), options)
        pending: dict[str, Weight] = {}
        layer = 0
        norm: np.ndarray | None = None
        head: Weight | None = None
        have_embed = False
        for name, w in it:
            if name == "model.embed_tokens.weight":
                graph.embeddings(w, tied_head=config.tie_word_embeddings)
                have_embed = True
            elif name.startswith("model.layers."):
                i_str, short = name[len("model.layers."):].split(".", 1)
                if int(i_str) != layer or not have_embed:
                    raise AssertionError(f"{name} arrived out of the quantizer's order (expected layer {layer})")
                pending[short.removesuffix(".weight")] = w
                if len(pending) == 9:  # 7 linears and 2 norms
                    graph.layer(layer, pending)
                    pending, layer = {}, layer + 1
            elif name == "model.norm.weight":
                norm = np.asarray(w, np.float32)
            elif name == "lm_head.weight":
                head = w
            else:
                raise AssertionError(f"unexpected tensor {name} in the stream")
        if layer != n_layers or pending or norm is None or (head is None) != config.tie_word_embeddings:
            raise AssertionError(f"incomplete stream: {layer} of {n_layers} layers, norm {norm is not None}")
        graph.final(norm, None if config.tie_word_embeddings else head)
        model = graph.model(metadata)
    (dest / "model.onnx").write_bytes(model.SerializeToString(deterministic=True))
    return graph
