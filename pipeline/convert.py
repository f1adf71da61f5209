"""Checkpoint → GGUF: choose each tensor's type, quantize (RTN, GPTQ, AWQ), pack, write.

The library side of `qkiln convert --to gguf`. Quantizers decide codes on a ggml grid; this module
only routes tensors to them and hands the resulting QuantizedTensors to the writer, which packs the
codes as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.formats.gguf_meta import Provenance, sha256_of
from qkiln.formats.gguf_write import FLOAT_TYPES, TensorPlan, Weight, WeightSpec, write_llama_gguf
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder
from qkiln.quantize.algorithms import ALGORITHMS


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    path: Path
    plans: list[TensorPlan]
    fallbacks: list[str]

    def summary(self) -> dict[str, Any]:
        by_type: dict[str, int] = {}
        for p in self.plans:
            by_type[p.ggml_type.name] = by_type.get(p.ggml_type.name, 0) + 1
        n_weights = sum(int(np.prod(p.shape)) for p in self.plans)
        n_bytes = sum(p.nbytes for p in self.plans)
        return {
            "path": str(self.path),
            "file_bytes": self.path.stat().st_size,
            "tensor_types": dict(sorted(by_type.items())),
            "bits_per_weight": round(8 * n_bytes / max(1, n_weights), 4),
            "fallbacks": self.fallbacks,
        }


def tensor_schemes(
    config: Any, shapes: dict[str, tuple[int, ...]], preset: str, *, uniform: bool = False
) -> tuple[dict[str, str], list[str]]:
    """Scheme name per quantized tensor, and the fallbacks taken (`tensor: why`).

    `preset` is one of llama.cpp's mixes (`q4_k_m`, and `q4_0` etc. as llama.cpp's quantize means them:
    Q6_K output/tied embedding, more bits on some attn_v/ffn_down), or with `uniform` one scheme for
    every quantizable tensor. Tensors absent from the result stay in float (norms; misfits).
    """
    from qkiln.quantize import rules

    if uniform or preset not in rules.preset_names():
        ruleset = rules.single(preset)
    else:
        ruleset = rules.preset(preset, config.num_hidden_layers, tied_embeddings=config.tie_word_embeddings)
    plan = ruleset.plan(shapes)
    schemes = {n: s for n, (s, _) in plan.items() if s != rules.KEEP}
    fallbacks = [f"{n}: {why}" for n, (_, why) in plan.items() if why]
    return schemes, fallbacks


def _check_gguf_types(preset: str, schemes: dict[str, str]) -> None:
    """Refuse, before any quantization work, a scheme that has no ggml block type (e.g. int4_g128, fp8)."""
    from qkiln.quantize.ggml_pack import GGML_TYPES

    for name, scheme in sorted(schemes.items()):
        if scheme not in GGML_TYPES:
            raise QuantizeError(
                f"scheme {preset!r} puts {name} on {scheme}, which GGUF has no block type for; "
                f"use f32, f16, bf16, {', '.join(GGML_TYPES)} or a llama.cpp mix such as q4_k_m"
            )


class CheckpointStream:
    """Weights read (and RTN-quantized) one at a time from a checkpoint, in llama.cpp's order."""

    def __init__(self, ckpt: Any, schemes: dict[str, str], float_type: str, progress: Callable[[str], None] | None = None):
        from qkiln.formats.gguf_write import _ordered

        self.ckpt, self.schemes, self.progress = ckpt, schemes, progress
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        self.specs = [_spec(n, shapes[n], schemes.get(n), float_type) for n in _ordered(ckpt.config, shapes)]

    def get(self, hf_name: str) -> Weight:
        w = self.ckpt.tensor(hf_name)
        if hf_name not in self.schemes:
            return np.asarray(w, dtype=np.float32)
        from qkiln.quantize.registry import get_scheme
        from qkiln.quantize.rtn import quantize_rtn

        if self.progress:
            self.progress(f"rtn {hf_name}")
        return quantize_rtn(w, get_scheme(self.schemes[hf_name]), name=hf_name)


class CalibratedStream:
    """`quantize.calibrate.quantize_model`'s layer-by-layer output as a writer stream.

    The file holds tensors in the order the quantizer yields them (embeddings, then layer by layer), so
    only the layer being quantized is in memory; a tensor asked for early is pulled ahead and kept.
    """

    def __init__(self, ckpt: Any, schemes: dict[str, str], algorithm: str, calib_ids: np.ndarray,
                 progress: Callable[[str], None] | None = None):
        from qkiln.model.names import LINEARS, NORMS
        from qkiln.quantize.calibrate import quantize_model
        from qkiln.quantize.registry import get_scheme

        cfg = ckpt.config

        class _Resolver:  # the rules' choices, already resolved; absent = kept in float (F16)
            @staticmethod
            def resolve(name: str, shape: tuple[int, ...]) -> tuple[Any, str | None]:
                return (get_scheme(schemes[name]) if name in schemes else None), None

        order = ["model.embed_tokens.weight"]
        for i in range(cfg.num_hidden_layers):
            order += [f"model.layers.{i}.{n}.weight" for n in (*LINEARS, *NORMS)]
        order.append("model.norm.weight")
        if not cfg.tie_word_embeddings:
            order.append("lm_head.weight")
        self.specs = [_spec(n, tuple(ckpt.shape(n)), schemes.get(n), "f16") for n in order]
        report = (lambda stage, done, total: progress(f"{algorithm} {stage} ({done}/{total})")) if progress else None
        self._gen = quantize_model(ckpt, _Resolver(), algorithm, calib_ids, progress=report)
        self._ahead: dict[str, Weight] = {}

    def get(self, hf_name: str) -> Weight:
        while hf_name not in self._ahead:
            try:
                name, w = next(self._gen)
            except StopIteration:
                raise AssertionError(f"the quantizer never produced {hf_name}") from None
            self._ahead[name] = w
        return self._ahead.pop(hf_name)


def _spec(name: str, shape: tuple[int, ...], scheme: str | None, float_type: str) -> WeightSpec:
    from gguf import GGMLQuantizationType

    from qkiln.quantize.ggml_pack import ggml_type_name

    if scheme is not None:
        return WeightSpec(name, shape, GGMLQuantizationType[ggml_type_name(scheme)])
    return WeightSpec(name, shape, GGMLQuantizationType.F32 if len(shape) == 1 else FLOAT_TYPES[float_type])


def calibration_windows(ckpt: Any, calib: Sequence[Path], samples: int, seq_len: int) -> np.ndarray:
    """(n, seq_len) token windows of the concatenated calibration files, tokenized without BOS."""
    from qkiln.quantize.calibrate import calibration_ids

    text = "".join(Path(p).read_text(encoding="utf-8") for p in calib)
    ids = np.asarray(ckpt.tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return calibration_ids(ids, samples, seq_len)


def weight_stream(
    ckpt: Any,
    schemes: dict[str, str],
    algorithm: str,
    calib: Sequence[Path],
    *,
    float_type: str = "f16",
    samples: int = 64,
    seq_len: int = 512,
    progress: Callable[[str], None] | None = None,
) -> CheckpointStream | CalibratedStream:
    """The model's weights, quantized by `algorithm` on `schemes`, handed to the writer one at a time."""
    if algorithm == "rtn":
        return CheckpointStream(ckpt, schemes, float_type, progress)
    if not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
    return CalibratedStream(ckpt, schemes, algorithm, calibration_windows(ckpt, calib, samples, seq_len), progress)


def quantize_weights(ckpt: Any, schemes: dict[str, str], algorithm: str, calib: Sequence[Path], **kw: Any) -> dict[str, Weight]:
    """All weights at once (HF name -> QuantizedTensor or float32 array); for tests and small models."""
    stream = weight_stream(ckpt, schemes, algorithm, calib, **kw)
    return {s.hf_name: stream.get(s.hf_name) for s in stream.specs}


def convert_to_gguf(
    model: Path,
    dest: Path,
    scheme: str,
    *,
    algorithm: str = "rtn",
    calib: Sequence[Path] = (),
    name: str | None = None,
    uniform: bool = False,
    samples: int = 64,
    seq_len: int = 512,
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert the checkpoint folder `model` into a llama.cpp GGUF at `dest` (atomic, deterministic)."""
    from qkiln.formats.hf import Checkpoint

    scheme = scheme.strip().lower()
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    ckpt = Checkpoint.open(model)
    config = ckpt.config
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    tokenizer = tokenizer_from_folder(ckpt.path, config.vocab_size, ids)
    fallbacks: list[str] = []
    if scheme in FLOAT_TYPES:
        if algorithm != "rtn":
            raise QuantizeError(f"--scheme {scheme} stores weights unquantized; --algo {algorithm} does not apply")
        weights: CheckpointStream | CalibratedStream = CheckpointStream(ckpt, {}, scheme, progress)
    else:
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        schemes, fallbacks = tensor_schemes(config, shapes, scheme, uniform=uniform)
        _check_gguf_types(scheme, schemes)
        # a 2-D tensor no block fits stays F16, as llama.cpp keeps it
        weights = weight_stream(ckpt, schemes, algorithm, calib, samples=samples, seq_len=seq_len, progress=progress)
    notes = {line.split(":", 1)[0]: line for line in fallbacks}
    prov = Provenance(
        name=name or ckpt.path.resolve().name,
        scheme=scheme,
        algorithm=algorithm if scheme not in FLOAT_TYPES else "none",
        calibration_sha256=sha256_of(calib) if calib and algorithm != "rtn" else None,
        source=ckpt.path.resolve().name,
        fallbacks=tuple(fallbacks),
    )
    plans = write_llama_gguf(dest, config, weights, tokenizer, prov, notes=notes)
    return ConvertResult(path=Path(dest), plans=plans, fallbacks=fallbacks)
