"""Packed linears for qkiln's runtime: a quantized artifact runs on its own blocks through the C kernels.

`PackedLinear` holds one weight matrix in a kernel layout and is the `op` that `LlamaModel.set_linear`
takes (x (tokens, in) f32 -> (tokens, out) f32). `load_gguf_model(path)` opens a llama GGUF as a runnable
model: linears whose ggml type has a kernel (Q4_0, Q8_0, Q4_K, Q6_K) stay packed — q/k rows put back in
Hugging Face order by moving whole rows of blocks, which is exact — and everything else (norms,
embeddings, other types) is dequantized with gguf-py as the importer does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qkiln.kernels import api
from qkiln.kernels.types import BLOCK, WType, block_bytes

KERNEL_TYPES = {int(t) for t in BLOCK}  # ggml type ids with a kernel


@dataclass
class PackedLinear:
    """One (out, in) weight in a kernel layout; calling it runs y = x W^T on the quantized blocks.

    Q4_0 is repacked once at load where the path has a faster layout (Q4_0X2 row pairs for smmla on i8mm,
    Q4_0X8/Q8_0X8 8-row groups on AVX-512 VNNI), as llama.cpp does.
    """

    wtype: WType
    data: np.ndarray  # (bytes,) uint8 in wtype's layout
    out_features: int
    in_features: int
    nthreads: int | None = None
    _run_type: WType = field(init=False)
    _run_data: np.ndarray = field(init=False, repr=False)
    _fn: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.wtype = WType(self.wtype)
        self.data = np.ascontiguousarray(self.data).view(np.uint8).reshape(-1)
        want = block_bytes(self.wtype, self.out_features, self.in_features)
        if self.data.size != want:
            raise ValueError(f"{self.wtype.name} ({self.out_features}, {self.in_features}) needs {want} bytes, "
                             f"got {self.data.size}")
        self._run_type, self._run_data = self.wtype, self.data
        if api.prefers_repacked():
            self._run_type, self._run_data = api.repacked(self.wtype, self.data, self.out_features, self.in_features)
        self._fn = api.linear_fn(self._run_type, self._run_data, self.out_features, self.in_features, self.nthreads)

    @property
    def nbytes(self) -> int:
        return int(self.data.size)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self._fn(x)  # x (tokens, in) -> (tokens, out)


class FusedPacked:
    """Linears that read the same input (q/k/v, gate/up) as ONE packed matrix: the first member called with an
    input runs the whole product once and the others return their slice of it. Fewer, larger products per
    token: one activation quantization, one thread hand-off. The cache is keyed by the input object itself
    (the runtime passes the same array to each member, unmodified); any other input recomputes."""

    def __init__(self, members: list[tuple[str, PackedLinear]]):
        first = members[0][1]
        assert all(m.wtype == first.wtype and m.in_features == first.in_features for _, m in members)
        data = np.concatenate([m.data for _, m in members])
        self.names = [name for name, _ in members]
        self.bounds = np.cumsum([0] + [m.out_features for _, m in members])
        self.linear = PackedLinear(first.wtype, data, int(self.bounds[-1]), first.in_features, first.nthreads)
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None
        self._pending: set[int] = set()

    def member(self, i: int) -> FusedMember:
        return FusedMember(self, i)

    def _slice(self, i: int, x: np.ndarray) -> np.ndarray:
        if not (self._x is x and i in self._pending):
            self._x, self._y = x, self.linear(x)
            self._pending = set(range(len(self.names)))
        self._pending.discard(i)
        y = self._y
        assert y is not None
        if not self._pending:
            self._x = self._y = None  # drop the references once every member has its slice
        return y[:, self.bounds[i] : self.bounds[i + 1]]


@dataclass(frozen=True)
class FusedMember:
    """Member `index` of a FusedPacked, as a linear op (the decode step reads `fused` to run the whole product)."""

    fused: FusedPacked
    index: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.fused._slice(self.index, x)  # x (tokens, in) -> (tokens, out of this member)


def fuse_shared_inputs(packed: dict[str, PackedLinear]) -> dict[str, object]:
    """Replace each layer's q/k/v and gate/up PackedLinears by members of a FusedPacked when they share a
    weight type; everything else is returned unchanged."""
    out: dict[str, object] = dict(packed)
    groups = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
    prefixes = {name.rsplit(".", 2)[0] for name in packed if name.startswith("model.layers.")}
    for prefix in prefixes:
        for group in groups:
            names = [f"{prefix}.{g}" for g in group]
            if not all(n in packed for n in names):
                continue
            ops = [packed[n] for n in names]
            if len({(o.wtype, o.in_features) for o in ops}) != 1:
                continue
            fused = FusedPacked(list(zip(names, ops, strict=True)))
            for i, n in enumerate(names):
                out[n] = fused.member(i)
    return out


def plug_packed_linears(model, packed: dict) -> int:
    """`model.set_linear(name, op)` for every HF module name in `packed`; returns how many were plugged."""
    for name, op in packed.items():
        model.set_linear(name, op)
    return len(packed)


def packed_linear_from_quantized(qt, nthreads: int | None = None):
    """A QuantizedTensor -> a linear op on its packed form: PackedLinear on its ggml blocks for llama.cpp grids
    (quantize/ggml_pack.py), `api.Int4GLinear` for INT4 grids (per group or per channel, zero point or
    symmetric; INT4GX8 on AVX-512), or None when no kernel fits (the caller keeps the dense weight)."""
    from gguf import GGMLQuantizationType

    from qkiln.errors import QuantizeError
    from qkiln.quantize.ggml_pack import ggml_type_name, pack_blocks

    int4 = int4_linear_from_quantized(qt, nthreads)
    if int4 is not None:
        return int4
    try:
        tid = int(GGMLQuantizationType[ggml_type_name(qt.scheme.name)])
    except QuantizeError:
        return None
    rows, cols = qt.shape
    if tid not in KERNEL_TYPES or cols % BLOCK[WType(tid)][0]:
        return None
    return PackedLinear(WType(tid), np.ascontiguousarray(pack_blocks(qt)).reshape(-1), rows, cols, nthreads)


def int4_linear_from_quantized(qt, nthreads: int | None = None) -> api.Int4GLinear | None:
    """INT4 codes (rows, cols) 0..15 with fp16 scales (and zero points) per group -> the INT4 kernel's arrays:
    codes in Q4_0's nibble order per 32 columns, fp32 scales (exact), zeros (8 for symmetric grids)."""
    from qkiln.quantize.int_grid import IntGrid

    scheme = qt.scheme
    rows, cols = qt.shape
    if not isinstance(scheme, IntGrid) or scheme.bits != 4 or cols % 32:
        return None
    group = scheme.group or cols
    if group % 32 or cols % group:
        return None
    q = np.asarray(qt.codes, np.uint8).reshape(rows, cols // 32, 2, 16)  # (rows, blocks, half, 16)
    codes = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(rows, cols // 2)  # byte j = elem j | elem j + 16 << 4
    scales = np.asarray(qt.params["scale"], np.float32).reshape(rows, cols // group)
    zeros = (np.asarray(qt.params["zero"], np.uint8) if not scheme.symmetric
             else np.full(scales.shape, scheme.shift, np.uint8)).reshape(rows, cols // group)
    return api.Int4GLinear(codes, scales, zeros, group, rows, cols, nthreads)


def plug_quantized(model, tensors: dict, nthreads: int | None = None) -> list[str]:
    """Plug a packed op for every (HF weight or module name -> QuantizedTensor) with a kernel; returns the
    names that stayed dense (replace those with `model.replace_tensor(name, qt.dequantize())`)."""
    dense = []
    for name, qt in tensors.items():
        op = packed_linear_from_quantized(qt, nthreads)
        if op is None:
            dense.append(name)
        else:
            model.set_linear(name.removesuffix(".weight"), op)
    return dense


def _rows(t) -> np.ndarray:
    """A GGUF tensor's bytes as (out rows, bytes per row) uint8."""
    return np.asarray(t.data, dtype=np.uint8).reshape(t.shape[0], -1)


class GGUFSource:
    """TensorSource over a llama GGUF: dequantizes on request (only what is not packed is ever asked)."""

    def __init__(self, f, config):
        from qkiln.formats.gguf_import import load_llama_tensors  # noqa: F401  (validates the import path)
        from qkiln.model.names import GGUF_DERIVED, gguf_to_hf_name

        self.config = config
        self._f = f
        self._by_hf = {gguf_to_hf_name(n, config.num_hidden_layers): n for n in f.tensors if n not in GGUF_DERIVED}

    def names(self) -> list[str]:
        return list(self._by_hf)

    def gguf_tensor(self, hf_name: str):
        return self._f.tensors[self._by_hf[hf_name]]

    def tensor(self, name: str) -> np.ndarray:
        from qkiln.formats.gguf_import import _dequantize
        from qkiln.model.names import is_k_proj, is_q_proj, unpermute_qk

        w = _dequantize(self._f, self.gguf_tensor(name))
        if is_q_proj(name):
            w = unpermute_qk(w, self.config.num_attention_heads)
        elif is_k_proj(name):
            w = unpermute_qk(w, self.config.num_attention_heads, self.config.num_key_value_heads)
        return w


def packed_linears_from_gguf(source: GGUFSource, nthreads: int | None = None) -> dict[str, PackedLinear]:
    """A PackedLinear per linear (and the head, tied or not) whose ggml type has a kernel."""
    from qkiln.model.names import is_k_proj, is_q_proj, unpermute_qk

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
    import tokenizers

    from qkiln.formats.gguf_import import config_from_gguf
    from qkiln.formats.gguf_read import read_gguf
    from qkiln.formats.tokenizer_gguf import tokenizer_files
    from qkiln.runtime.llama import LlamaModel
    from qkiln.runtime.load import LoadedModel

    f = read_gguf(path)
    cfg = config_from_gguf(f)
    source = GGUFSource(f, cfg)
    model = LlamaModel(source)
    plug_packed_linears(model, fuse_shared_inputs(packed_linears_from_gguf(source, nthreads)))
    tok = tokenizers.Tokenizer.from_str(
        tokenizer_files(f.metadata, where=str(path), model_max_length=cfg.max_position_embeddings)["tokenizer.json"])
    return LoadedModel(path=Path(path), model=model, tokenizer=tok)
