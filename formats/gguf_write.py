"""Write GGUF v3 files that llama.cpp loads as they are, packing qkiln's codes without re-quantizing.

Two layers:
- `write_gguf`: any metadata + tensors already planned as (GGUF name, shape, ggml type, bytes producer).
  Tensors are produced and written one at a time, so peak memory is one packed tensor, and the
  file appears at its destination only when complete (`atomic_file`).
- `plan_llama_tensors` / `write_llama_gguf`: a Llama model's weights (HF names) → llama.cpp's names,
  q/k rotary permutation, 1-D tensors in F32, each 2-D weight in its own type.

The q/k permutation reorders *rows* of q_proj/k_proj (output features). ggml blocks run along a row
(input features), so permuting the rows of a QuantizedTensor's codes and params is exact: the same
blocks, in another row order. We permute the QuantizedTensor and pack it; we never re-quantize.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeAlias

import ml_dtypes
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from qkiln.atomic import atomic_file
from qkiln.errors import GGUFError, QuantizeError
from qkiln.formats import gguf_meta
from qkiln.formats.gguf_meta import KV, Provenance
from qkiln.formats.tokenizer_to_gguf import GGUFTokenizer
from qkiln.model import names as llama_names
from qkiln.model.config import LlamaConfig
from qkiln.model.source import LazyRows, block_rows, row_blocks
from qkiln.quantize.ggml_pack import GGML_TYPES, ggml_type_name, pack_blocks
from qkiln.quantize.tensor import QuantizedTensor

FLOAT_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
}


def data_nbytes(shape: tuple[int, ...], ggml_type: GGMLQuantizationType) -> int:
    """Bytes of a tensor of `shape` stored as `ggml_type` (rows of whole blocks)."""
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    assert shape[-1] % block == 0, (shape, ggml_type)
    return math.prod(shape[:-1]) * (shape[-1] // block) * type_size


class ByteChunks:
    """A tensor's bytes made a block of rows at a time, as they are written: what gguf-py's writer needs of a
    tensor here is `nbytes` and `tofile` (its own lazy tensors have the same two)."""

    def __init__(self, nbytes: int, chunks: Iterable[np.ndarray]):
        self.nbytes, self._chunks = nbytes, chunks

    def tofile(self, f: Any) -> None:
        written = 0
        for c in self._chunks:
            b = np.ascontiguousarray(c).reshape(-1).view(np.uint8)
            b.tofile(f)
            written += b.nbytes
        if written != self.nbytes:
            raise AssertionError(f"produced {written} bytes, planned {self.nbytes}")


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One tensor as it will sit in the file.

    shape    logical shape in NumPy order, (rows, cols) or (n,); GGUF stores it reversed
    produce  returns exactly `nbytes` bytes of ggml data (any dtype; written as raw bytes), as one array
             or as `ByteChunks` (a block of rows at a time: a tensor larger than a layer is never whole)
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    produce: Callable[[], np.ndarray | ByteChunks]
    note: str = ""  # e.g. "fallback q4_k -> q5_0", shown by `convert`

    @property
    def nbytes(self) -> int:
        return data_nbytes(self.shape, self.ggml_type)

    @property
    def byte_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-1], self.nbytes // max(1, math.prod(self.shape[:-1])))


def write_gguf(dest: str | Path, arch: str, kv: Iterable[KV], tensors: list[TensorPlan]) -> Path:
    """Write a GGUF v3 file: header, metadata in the given order, tensor infos, aligned data.

    The bytes depend only on the arguments (no timestamps, no paths), so equal inputs give
    identical files.
    """
    dest = Path(dest)
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise GGUFError(f"duplicate tensor names in {dest.name}")
    try:
        _write(dest, arch, kv, tensors)
    except OSError as e:  # a folder that refuses writes, a full disk: the user's environment, not a bug
        raise GGUFError(f"cannot write {dest}: {e.strerror or e}; choose another output path") from None
    return dest


def _write(dest: Path, arch: str, kv: Iterable[KV], tensors: list[TensorPlan]) -> None:
    with atomic_file(dest) as tmp:
        writer = GGUFWriter(tmp, arch)
        try:
            for key, value, vtype in kv:
                if key == "general.architecture":
                    continue  # GGUFWriter writes it first
                writer.add_key_value(key, value, vtype)
            for t in tensors:
                writer.add_tensor_info(t.name, t.byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                made = t.produce()
                data = made if isinstance(made, ByteChunks) else np.ascontiguousarray(made).reshape(-1).view(np.uint8)
                if data.nbytes != t.nbytes:
                    raise AssertionError(f"{t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
                # ByteChunks has what write_tensor_data uses of an array (nbytes, tofile), as gguf's lazy tensors
                writer.write_tensor_data(data)  # type: ignore[arg-type]
        finally:
            writer.close()


# ---------------------------------------------------------------------------------------------
# Llama models


def ggml_type_of(qt: QuantizedTensor) -> GGMLQuantizationType:
    """The ggml block type that stores this scheme's codes and params exactly."""
    return GGMLQuantizationType[ggml_type_name(qt.scheme.name)]


def float_bytes(w: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """A float tensor in F32/F16/BF16 (BF16 rounds to nearest even, as llama.cpp's converter does)."""
    if ggml_type == GGMLQuantizationType.F32:
        return np.asarray(w, dtype=np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return np.asarray(w, dtype=np.float32).astype(np.float16)
    if ggml_type == GGMLQuantizationType.BF16:
        return np.asarray(w, dtype=np.float32).astype(ml_dtypes.bfloat16)
    raise GGUFError(f"{ggml_type.name} is a block type; pass a QuantizedTensor, not a float array")


def float_roundtrip(w: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """The float32 values llama.cpp will see for `w` stored as `ggml_type` (F32/F16/BF16)."""
    return float_bytes(w, ggml_type).astype(np.float32)


def permute_qt(qt: QuantizedTensor, order: np.ndarray) -> QuantizedTensor:
    """The same QuantizedTensor with rows reordered (`out[i] = in[order[i]]`); exact, no re-quantizing."""
    params = {k: np.ascontiguousarray(v[order]) for k, v in qt.params.items()}
    return QuantizedTensor(qt.scheme, np.ascontiguousarray(qt.codes[order]), params, qt.name)


def _pack(qt: QuantizedTensor) -> np.ndarray:
    packed = pack_blocks(qt)
    return packed if isinstance(packed, np.ndarray) else np.frombuffer(packed, dtype=np.uint8)


Weight: TypeAlias = QuantizedTensor | np.ndarray | LazyRows


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """What the file will hold for one HF tensor, known before its values are computed."""

    hf_name: str
    shape: tuple[int, ...]  # HF layout, (out, in) or (n,)
    ggml_type: GGMLQuantizationType


class WeightStream(Protocol):
    """Weights handed out one at a time, in `specs` order, so a writer never holds the whole model.

    `get` is called exactly once per spec, in order; what it returns must match the spec (a
    QuantizedTensor of that ggml type, or a float array for F32/F16/BF16).
    """

    specs: list[WeightSpec]

    def get(self, hf_name: str) -> Weight: ...


class _DictStream:
    """A dict of computed weights as a stream, in llama.cpp's converter order."""

    def __init__(self, config: LlamaConfig, weights: Mapping[str, Weight], float_type: GGMLQuantizationType):
        self._weights = weights
        self.specs = []
        for name in _ordered(config, weights):
            w = weights[name]
            if isinstance(w, QuantizedTensor):
                self.specs.append(WeightSpec(name, w.shape, ggml_type_of(w)))
            else:
                shape = tuple(np.shape(w))
                if len(shape) not in (1, 2):
                    raise GGUFError(f"{name}: {len(shape)}-D tensors are not part of a Llama model")
                self.specs.append(WeightSpec(name, shape, GGMLQuantizationType.F32 if len(shape) == 1 else float_type))

    def get(self, hf_name: str) -> Weight:
        return self._weights[hf_name]


# The grids a GGUF stores as they are: ggml's block types (and F32/F16/BF16 for what stays in float).
GRIDS: tuple[str, ...] = tuple(GGML_TYPES)


def check_grids(label: str, schemes: Mapping[str, str]) -> None:
    """Refuse, before any quantization work, a scheme that has no ggml block type (e.g. int4_g128, fp8)."""
    for name, scheme in sorted(schemes.items()):
        if scheme not in GRIDS:
            raise QuantizeError(
                f"scheme {label!r} puts {name} on {scheme}, which GGUF has no block type for; "
                f"use f32, f16, bf16, {', '.join(GRIDS)} or a llama.cpp mix such as q4_k_m"
            )


def weight_spec(name: str, shape: tuple[int, ...], scheme: str | None, float_type: str) -> WeightSpec:
    """The spec of a tensor on `scheme` (its ggml block type), or kept in float: 1-D F32, 2-D `float_type`."""
    if scheme is not None:
        return WeightSpec(name, shape, GGMLQuantizationType[ggml_type_name(scheme)])
    return WeightSpec(name, shape, GGMLQuantizationType.F32 if len(shape) == 1 else FLOAT_TYPES[float_type])


class StreamWeights:
    """A pipeline stream (names, shape, get, `ordered`; see qkiln.pipeline.stream) as this writer's
    WeightStream: in llama.cpp's converter order when the stream hands tensors out in any order, in the
    stream's own order when it is `ordered` (calibrated: one layer in memory)."""

    def __init__(self, config: LlamaConfig, stream: Any, schemes: Mapping[str, str], float_type: str):
        self._stream = stream
        shapes = {n: stream.shape(n) for n in stream.names}
        order = stream.names if stream.ordered else _ordered(config, shapes)
        self.specs = [weight_spec(n, shapes[n], schemes.get(n), float_type) for n in order]

    def get(self, hf_name: str) -> Weight:
        return self._stream.get(hf_name)


def _tensor_bytes(config: LlamaConfig, spec: WeightSpec, w: Weight) -> np.ndarray | ByteChunks:
    """Pack one weight as its spec says, q/k rows permuted for llama.cpp's rotary layout; a 2-D weight a
    block of rows at a time (rows are independent in every ggml type)."""
    order = _permutation(config, spec.hf_name)
    nbytes = data_nbytes(spec.shape, spec.ggml_type)
    if isinstance(w, QuantizedTensor):
        if w.shape != spec.shape or ggml_type_of(w) != spec.ggml_type:
            raise AssertionError(f"{spec.hf_name}: got {ggml_type_of(w).name} {w.shape}, planned {spec.ggml_type.name} {spec.shape}")
        qt = permute_qt(w, order) if order is not None else w
        step = block_rows(qt.shape[1])
        return ByteChunks(nbytes, (_pack(qt.take_rows(slice(r0, r0 + step))) for r0 in range(0, qt.shape[0], step)))
    if tuple(w.shape) != spec.shape:
        raise AssertionError(f"{spec.hf_name}: got shape {tuple(w.shape)}, planned {spec.shape}")
    if order is not None:
        w = np.asarray(w)[order]
    if len(spec.shape) == 1:
        return float_bytes(np.asarray(w), spec.ggml_type)
    return ByteChunks(nbytes, (float_bytes(b, spec.ggml_type) for b in row_blocks(w)))


def _produce(config: LlamaConfig, spec: WeightSpec, stream: WeightStream) -> np.ndarray | ByteChunks:
    return _tensor_bytes(config, spec, stream.get(spec.hf_name))


def plan_llama_tensors(
    config: LlamaConfig,
    weights: Mapping[str, Weight] | WeightStream,
    *,
    float_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    notes: Mapping[str, str] | None = None,
) -> list[TensorPlan]:
    """Tensor plans for HF-named weights: GGUF names, types and sizes now, bytes when written.

    `weights` is a dict (HF name -> QuantizedTensor packed exactly, or float array: 2-D stored as
    `float_type`, 1-D always F32; written in llama.cpp's converter order) or a `WeightStream`
    (written in its own order, one tensor in memory at a time). Tied embeddings write no
    `output.weight` (llama.cpp reuses `token_embd`). `rope_freqs.weight` is added for `llama3` rope scaling.
    """
    stream: WeightStream = _DictStream(config, weights, float_type) if isinstance(weights, Mapping) else weights
    _ordered(config, {s.hf_name: None for s in stream.specs})  # complete, and nothing foreign
    notes = notes or {}
    plans: list[TensorPlan] = []
    for spec in stream.specs:
        if spec.hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        plans.append(
            TensorPlan(
                llama_names.hf_to_gguf_name(spec.hf_name, config.num_hidden_layers),
                spec.shape,
                spec.ggml_type,
                functools.partial(_produce, config, spec, stream),
                notes.get(spec.hf_name, ""),
            )
        )
    factors = gguf_meta.rope_freq_factors(config)
    if factors is not None:
        plans.insert(
            _after_embeddings(plans),
            TensorPlan("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, functools.partial(np.asarray, factors)),
        )
    return plans


def _after_embeddings(plans: list[TensorPlan]) -> int:
    """Index after the leading global tensors (rope_freqs sits with them, as llama.cpp's converter puts it)."""
    for i, p in enumerate(plans):
        if p.name.startswith("blk."):
            return i
    return len(plans)


def _ordered(config: LlamaConfig, weights: Mapping[str, Any]) -> list[str]:
    """HF names in llama.cpp's converter order (globals, then layer by layer); refuses gaps and strays."""
    modules = [f"{m}.weight" for m in llama_names.hf_modules(config.num_hidden_layers)]
    if config.tie_word_embeddings:
        modules.remove("lm_head.weight")
    absent = [n for n in modules if n not in weights]
    if absent:
        raise GGUFError(f"model lacks {absent[0]} ({len(absent)} tensors missing); cannot write a complete GGUF")
    strays = sorted(set(weights) - set(modules) - {"lm_head.weight"})
    if strays:
        raise GGUFError(f"tensor {strays[0]} is not part of a Llama model; qkiln cannot place it in GGUF")
    return modules


def _permutation(config: LlamaConfig, hf_name: str) -> np.ndarray | None:
    """Row order llama.cpp expects for q_proj/k_proj (its rotary pairs), None for other tensors."""
    if llama_names.is_q_proj(hf_name):
        return llama_names.permute_qk(np.arange(config.num_attention_heads * config.head_dim), config.num_attention_heads)
    if llama_names.is_k_proj(hf_name):
        rows = config.num_key_value_heads * config.head_dim
        return llama_names.permute_qk(np.arange(rows), config.num_attention_heads, config.num_key_value_heads)
    return None


def llama_metadata(
    config: LlamaConfig,
    tokenizer: GGUFTokenizer,
    provenance: Provenance,
    tensor_types: Iterable[GGMLQuantizationType],
) -> list[KV]:
    """All key/values of a llama GGUF in a fixed order."""
    items: list[tuple[str, Any]] = [("general.architecture", gguf_meta.ARCH)]
    items += provenance.general_items()
    items += gguf_meta.llama_hparams(config)
    items.append(("general.file_type", gguf_meta.file_type(provenance.scheme, tensor_types)))
    items.append(("general.quantization_version", 2))
    items += provenance.qkiln_items()
    items += tokenizer.items()
    return [gguf_meta.typed(k, v) for k, v in items]


def write_llama_gguf(
    dest: str | Path,
    config: LlamaConfig,
    weights: Mapping[str, Weight] | WeightStream,
    tokenizer: GGUFTokenizer,
    provenance: Provenance,
    *,
    float_type: str = "f32",
    notes: Mapping[str, str] | None = None,
) -> list[TensorPlan]:
    """Write a llama.cpp-loadable GGUF; returns the tensor plans (names, types, sizes) it wrote."""
    if float_type not in FLOAT_TYPES:
        raise GGUFError(f"unknown float type {float_type!r}; use f32, f16 or bf16")
    if len(tokenizer.tokens) != config.vocab_size:
        raise GGUFError(f"tokenizer has {len(tokenizer.tokens)} tokens but the model {config.vocab_size} embedding rows")
    plans = plan_llama_tensors(config, weights, float_type=FLOAT_TYPES[float_type], notes=notes)
    kv = llama_metadata(config, tokenizer, provenance, [p.ggml_type for p in plans if len(p.shape) == 2])
    write_gguf(dest, gguf_meta.ARCH, kv, plans)
    return plans
