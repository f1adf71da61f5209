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
from qkiln.formats.gguf_write import FLOAT_TYPES, TensorPlan, Weight, write_llama_gguf
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder

ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")


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


def quantize_weights(
    ckpt: Any,
    schemes: dict[str, str],
    algorithm: str,
    calib: Sequence[Path],
    *,
    samples: int = 64,
    seq_len: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Weight]:
    """HF name → QuantizedTensor (2-D weights in `schemes`) or float32 array (the rest).

    RTN quantizes tensor by tensor; GPTQ/AWQ go through `quantize.calibrate.quantize_model`, layer by
    layer on `samples` windows of `seq_len` tokens of the calibration text.
    """
    from qkiln.quantize.registry import get_scheme

    if algorithm == "rtn":
        from qkiln.quantize.rtn import quantize_rtn

        out: dict[str, Weight] = {}
        for name in ckpt.names():
            w = ckpt.tensor(name)
            if name in schemes:
                if progress:
                    progress(name)
                out[name] = quantize_rtn(w, get_scheme(schemes[name]), name=name)
            else:
                out[name] = np.asarray(w, dtype=np.float32)
        return out
    if not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
    from qkiln.quantize.calibrate import calibration_ids, quantize_model

    def scheme_for(name: str, shape: tuple[int, ...]) -> Any:
        if name not in schemes:
            raise QuantizeError(f"{name}: no GGUF block fits its shape {shape}; --algo {algorithm} needs every weight quantized")
        return get_scheme(schemes[name])

    text = "".join(Path(p).read_text(encoding="utf-8") for p in calib)
    ids = np.asarray(ckpt.tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)
    calib_ids = calibration_ids(ids, samples, seq_len)
    report = (lambda stage, done, total: progress(f"{algorithm} {stage} ({done}/{total})")) if progress else None
    return dict(quantize_model(ckpt, scheme_for, algorithm, calib_ids, progress=report))


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
        weights: dict[str, Weight] = {n: np.asarray(ckpt.tensor(n), dtype=np.float32) for n in ckpt.names()}
        float_type = scheme
    else:
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        schemes, fallbacks = tensor_schemes(config, shapes, scheme, uniform=uniform)
        _check_gguf_types(scheme, schemes)
        weights = quantize_weights(ckpt, schemes, algorithm, calib, samples=samples, seq_len=seq_len, progress=progress)
        float_type = "f16"  # a 2-D tensor no block fits stays F16, as llama.cpp keeps it
    notes = {line.split(":", 1)[0]: line for line in fallbacks}
    prov = Provenance(
        name=name or ckpt.path.resolve().name,
        scheme=scheme,
        algorithm=algorithm if scheme not in FLOAT_TYPES else "none",
        calibration_sha256=sha256_of(calib) if calib and algorithm != "rtn" else None,
        source=ckpt.path.resolve().name,
        fallbacks=tuple(fallbacks),
    )
    plans = write_llama_gguf(dest, config, weights, tokenizer, prov, float_type=float_type, notes=notes)
    return ConvertResult(path=Path(dest), plans=plans, fallbacks=fallbacks)
