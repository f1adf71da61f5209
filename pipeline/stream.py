"""Checkpoint -> rules -> a stream of (name, QuantizedTensor | float32 array), whatever the output format.

The part of every command that writes quantized weights (`convert`, `quantize`, later `build`) and that no
format owns: choose each tensor's grid by rules, cut the calibration text into windows, and hand the
weights out one at a time — RTN in any order (a writer asks in its own), or the layer-by-layer calibrated
order of `quantize.calibrate.quantize_model` (only the layer being quantized is in memory). A writer turns
the stream into its own layout; it never re-quantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np

from qkiln.errors import QuantizeError, UserError
from qkiln.model.source import TensorSource
from qkiln.quantize import rules
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.calibrate import calibration_ids, output_order, quantize_model
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.tensor import QuantizedTensor

Weight: TypeAlias = QuantizedTensor | np.ndarray


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
        w = self.source.tensor(name)
        if name not in self.schemes:
            return np.asarray(w, dtype=np.float32)
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
) -> RTNStream | LayerStream:
    """The model's weights, quantized by `algorithm` on `schemes` (HF name -> scheme name, from
    `tensor_schemes`), handed out one at a time."""
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm == "rtn":
        return RTNStream(source, schemes, progress)
    if not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
    report = (lambda stage, done, total: progress(f"{algorithm} {stage} ({done}/{total})")) if progress else None
    ids = calibration_windows(source, calib, samples, seq_len)
    return LayerStream(source, _Planned(schemes), algorithm, ids, progress=report)


def layer_ordered(
    source: Any,
    schemes: Mapping[str, str],
    algorithm: str,
    calib: Sequence[Path],
    *,
    samples: int = CALIBRATION_SAMPLES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    progress: Callable[[str], None] | None = None,
) -> Iterator[tuple[str, Weight]]:
    """(name, QuantizedTensor | float32 array) in the quantizer's layer order (embeddings, layer by layer,
    model.norm, lm_head when untied): what the writers that append as they go (ONNX external data,
    safetensors shards) consume, with only the layer being quantized in memory."""
    stream = weight_stream(source, schemes, algorithm, calib, samples=samples, seq_len=seq_len, progress=progress)
    return ((name, stream.get(name)) for name in output_order(source.config))


def quantize_weights(source: Any, schemes: dict[str, str], algorithm: str, calib: Sequence[Path], **kw: Any) -> dict[str, Weight]:
    """All weights at once (HF name -> QuantizedTensor or float32 array); for tests and small models."""
    stream = weight_stream(source, schemes, algorithm, calib, **kw)
    return {n: stream.get(n) for n in stream.names}
