"""Checkpoint -> rules -> a stream of (name, QuantizedTensor | float32 array), whatever the output format.

The part of every command that writes quantized weights (`convert`, `quantize`, later `build`) and that no
format owns: choose each tensor's grid by rules, cut the calibration text into windows, and hand the
weights out one at a time — RTN in any order (a writer asks in its own), or the layer-by-layer calibrated
order of `quantize.calibrate.quantize_model` (only the layer being quantized is in memory). A writer turns
the stream into its own layout; it never re-quantizes.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from qkiln.errors import QuantizeError, UserError
from qkiln.hashing import sha256_of
from qkiln.model.source import LazyRows, TensorSource, read_lazily
from qkiln.quantize import rules
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.calibrate import calibration_ids, output_order, quantize_model
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.tensor import QuantizedTensor

Weight: TypeAlias = QuantizedTensor | np.ndarray | LazyRows  # LazyRows: a float tensor read as it is written


def tensor_schemes(
    config: Any, shapes: dict[str, tuple[int, ...]], preset: str, *, uniform: bool = False
) -> tuple[dict[str, str], list[str]]:
    """Scheme name per quantized tensor, and the fallbacks taken (`tensor: why`).

    `preset` is one of llama.cpp's mixes (`q4_k_m`, and `q4_0` etc. as llama.cpp's quantize means them:
    Q6_K output/tied embedding, more bits on some attn_v/ffn_down), or with `uniform` one scheme for
    every quantizable tensor. Tensors absent from the result stay in float (norms; misfits).
    """
    if uniform or preset not in rules.preset_names():
        ruleset = rules.single(preset)
    else:
        ruleset = rules.preset(preset, config.num_hidden_layers, tied_embeddings=config.tie_word_embeddings)
    plan = ruleset.plan(shapes)
    schemes = {n: s for n, (s, _) in plan.items() if s != rules.KEEP}
    fallbacks = [f"{n}: {why}" for n, (_, why) in plan.items() if why]
    return schemes, fallbacks


def read_calibration(paths: Sequence[Path]) -> str:
    """The calibration files' text, concatenated; a file that is not UTF-8 is the user's to fix."""
    parts = []
    for p in paths:
        try:
            parts.append(Path(p).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"--calib {p} is not UTF-8 text") from None
    return "".join(parts)


def calibration_tokens(ckpt: Any, text: str) -> np.ndarray:
    """The text's token ids (without BOS or other added tokens), int64."""
    return np.asarray(ckpt.tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)


def calibration_windows(ckpt: Any, calib: Sequence[Path], samples: int, seq_len: int) -> np.ndarray:
    """(n, seq_len) token windows of the concatenated calibration files, tokenized without BOS."""
    return calibration_ids(calibration_tokens(ckpt, read_calibration(calib)), samples, seq_len)


class RTNStream:
    """Weights read (and RTN-quantized) one at a time from a source, in whatever order they are asked for."""

    ordered = False

    def __init__(self, source: Any, schemes: Mapping[str, str], progress: Callable[[str], None] | None = None):
        self.source, self.schemes, self.progress = source, schemes, progress
        self.names = list(source.names())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(name))

    def scheme(self, name: str) -> str | None:
        return self.schemes.get(name)

    def get(self, name: str) -> Weight:
        w = read_lazily(self.source, name)
        if name not in self.schemes:
            return w
        if self.progress:
            self.progress(f"rtn {name}")
        return quantize_rtn(w, get_scheme(self.schemes[name]), name=name)

    def __iter__(self) -> Iterator[tuple[str, Weight]]:
        return ((n, self.get(n)) for n in self.names)


class LayerStream:
    """`quantize.calibrate.quantize_model`'s layer-by-layer output: `names` is the quantizer's own output
    order (`quantize.calibrate.output_order`), and `get` must follow it to keep memory at one layer (a tensor
    asked for early is pulled ahead and kept)."""

    ordered = True

    def __init__(self, source: TensorSource, ruleset: Any, algorithm: str, calib_ids: np.ndarray | None,
                 progress: Callable[[str, int, int], None] | None = None, **options: Any):
        self.source = source
        self.names = output_order(source.config)
        self._gen = quantize_model(source, ruleset, algorithm, calib_ids, progress=progress, **options)
        self._ahead: dict[str, Weight] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(name))  # type: ignore[attr-defined]

    def get(self, name: str) -> Weight:
        while name not in self._ahead:
            try:
                got, w = next(self._gen)
            except StopIteration:
                raise AssertionError(f"the quantizer never produced {name}") from None
            self._ahead[got] = w
        return self._ahead.pop(name)

    def __iter__(self) -> Iterator[tuple[str, Weight]]:
        return iter(self._gen)


class CodeStore:
    """The quantizer's output kept on disk under `folder`, so that a second writer of the same codes (another
    format on the same per-tensor grids, same algorithm and calibration) reads them instead of quantizing
    again — how `qkiln build` quantizes once per (grid, algorithm) and hands the codes to every format.

    One sub-folder per key (sha256 of the scheme map, algorithm, calibration text hash and settings), one
    `.npz` per tensor; `names.json` is written last and marks the recording complete. A stream that was not
    read to the end (a failed writer) is never replayed."""

    def __init__(self, folder: Path, label: str = ""):
        self.folder, self.label = Path(folder), label  # label: who records (an artifact's name)
        self.reused_from: str | None = None  # the label of the recording replayed, if one was

    def key(self, schemes: Mapping[str, str], algorithm: str, calib: Sequence[Path], samples: int, seq_len: int) -> str:
        doc: dict[str, Any] = {"schemes": dict(sorted(schemes.items())), "algorithm": algorithm}
        if algorithm != "rtn":
            doc |= {"calibration": sha256_of(calib), "samples": samples, "seq_len": seq_len}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def wrap(self, key: str, source: Any, make: Callable[[], RTNStream | LayerStream]) -> StoredStream | RecordingStream:
        """The stored codes of `key` when complete, else `make()`'s stream, recorded as it is read."""
        folder = self.folder / key
        if (folder / "names.json").is_file():
            self.reused_from = (folder / "label").read_text()
            return StoredStream(folder, source)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "label").write_text(self.label)
        return RecordingStream(make(), folder)


def _save_weight(path: Path, w: Weight) -> None:
    if isinstance(w, QuantizedTensor):
        arrays = {"codes": w.codes, **{f"param.{k}": v for k, v in w.params.items()}}
        np.savez(path, scheme=np.array(w.scheme.name), name=np.array(w.name), **arrays)
    else:
        np.savez(path, dense=np.asarray(w))


def _load_weight(path: Path) -> Weight:
    with np.load(path) as z:
        if "dense" in z:
            return z["dense"]
        params = {k.removeprefix("param."): z[k] for k in z.files if k.startswith("param.")}
        return QuantizedTensor(scheme=get_scheme(str(z["scheme"])), codes=z["codes"], params=params, name=str(z["name"]))


class RecordingStream:
    """A stream whose every tensor is also saved to `folder` as it is read (any order, any thread)."""

    def __init__(self, inner: RTNStream | LayerStream, folder: Path):
        self.inner, self.folder = inner, folder
        self.names, self.ordered = inner.names, inner.ordered
        self._left = set(self.names)
        self._lock = threading.Lock()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.inner.shape(name)

    def get(self, name: str) -> Weight:
        w = self.inner.get(name)
        _save_weight(self.folder / f"{name}.npz", w)
        with self._lock:
            self._left.discard(name)
            if not self._left:
                (self.folder / "names.json").write_text(json.dumps(self.names))
        return w

    def __iter__(self) -> Iterator[tuple[str, Weight]]:
        return ((n, self.get(n)) for n in self.names)


class StoredStream:
    """A complete recording replayed: the same tensors, in any order, without quantizing."""

    ordered = False

    def __init__(self, folder: Path, source: Any):
        self.folder, self.source = folder, source
        self.names = json.loads((folder / "names.json").read_text())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.source.shape(name))

    def get(self, name: str) -> Weight:
        return _load_weight(self.folder / f"{name}.npz")

    def __iter__(self) -> Iterator[tuple[str, Weight]]:
        return ((n, self.get(n)) for n in self.names)


Stream: TypeAlias = "RTNStream | LayerStream | RecordingStream | StoredStream"


class _Planned:
    """Per-tensor choices already made (name -> scheme name; absent = kept in float) as a quantize_model rule."""

    def __init__(self, schemes: Mapping[str, str]):
        self.schemes = schemes

    def resolve(self, name: str, shape: tuple[int, ...]) -> tuple[Scheme | None, str | None]:
        return (get_scheme(self.schemes[name]) if name in self.schemes else None), None


def weight_stream(
    source: Any,
    schemes: Mapping[str, str],
    algorithm: str,
    calib: Sequence[Path],
    *,
    samples: int = CALIBRATION_SAMPLES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    progress: Callable[[str], None] | None = None,
    store: CodeStore | None = None,
    rtn: Callable[..., RTNStream] = RTNStream,
) -> Stream:
    """The model's weights, quantized by `algorithm` on `schemes` (HF name -> scheme name, from
    `tensor_schemes`), handed out one at a time; with a `store`, codes made before for the same key are
    read back instead, and new ones are recorded. `rtn` makes the RTN stream (`ray_tasks.RayRTNStream`: Ray
    tasks)."""
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm != "rtn" and not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")

    def make() -> RTNStream | LayerStream:
        if algorithm == "rtn":
            return rtn(source, schemes, progress)
        report = (lambda stage, done, total: progress(f"{algorithm} {stage} ({done}/{total})")) if progress else None
        ids = calibration_windows(source, calib, samples, seq_len)
        return LayerStream(source, _Planned(schemes), algorithm, ids, progress=report)

    if store is None:
        return make()
    return store.wrap(store.key(schemes, algorithm, calib, samples, seq_len), source, make)


def layer_ordered(stream: Stream, config: Any) -> Iterator[tuple[str, Weight]]:
    """`stream`'s (name, QuantizedTensor | float32 array) in the quantizer's layer order (embeddings, layer by
    layer, model.norm, lm_head when untied): what the writers that append as they go (ONNX external data,
    safetensors shards) consume, with only the layer being quantized in memory."""
    return ((name, stream.get(name)) for name in output_order(config))


def quantize_weights(source: Any, schemes: dict[str, str], algorithm: str, calib: Sequence[Path], **kw: Any) -> dict[str, Weight]:
    """All weights at once (HF name -> QuantizedTensor or float32 array); for tests and small models."""
    stream = weight_stream(source, schemes, algorithm, calib, **kw)
    return {n: stream.get(n) for n in stream.names}
