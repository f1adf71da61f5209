"""`qkiln convert --to onnx`: the pipeline's quantized-tensor stream handed to the ONNX folder writer.

The writer only consumes (hf_name, QuantizedTensor | float32 array) in the quantizer's layer order, as
`pipeline.stream.layer_ordered` hands it out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qkiln.errors import QuantizeError
from qkiln.formats.hf import Checkpoint
from qkiln.formats.onnx_graph import ACCURACY_LEVELS, FLOAT_DTYPES, GraphOptions
from qkiln.formats.onnx_pack import check_onnx_scheme
from qkiln.formats.onnx_write import write_onnx_folder
from qkiln.hashing import sha256_of
from qkiln.pipeline.stream import CodeStore, RTNStream, layer_ordered, tensor_schemes, weight_stream
from qkiln.quantize import rules
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN
from qkiln.quantize.registry import get_scheme

EMBED = "model.embed_tokens.weight"


def onnx_schemes(ckpt: Any, scheme: str, *, strict: bool) -> tuple[dict[str, str], list[str]]:
    """Scheme per quantized tensor and the fallbacks taken; refuses, before any work, what MatMulNBits
    cannot hold and (with `strict`) any row the block does not divide."""
    if scheme in rules.preset_names():
        kind = "K-quant " if "_k" in scheme else ""
        raise QuantizeError(
            f"--scheme {scheme} is a llama.cpp {kind}mix; ONNX (MatMulNBits) takes one integer scheme: "
            "int4_g32, int4_g64, int4_g128 (add _asym for zero points) or int8"
        )
    check_onnx_scheme(get_scheme(scheme))
    config = ckpt.config
    shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    schemes, fallbacks = tensor_schemes(config, shapes, scheme, uniform=True)
    if not config.tie_word_embeddings:
        # An untied table is only gathered: quantizing it would lose accuracy and save nothing (the builder
        # keeps it in float too).
        schemes.pop(EMBED, None)
        fallbacks = [f for f in fallbacks if not f.startswith(EMBED + ":")]
    if strict and fallbacks:
        more = f" (and {len(fallbacks) - 1} more)" if len(fallbacks) > 1 else ""
        raise QuantizeError(f"--strict: {fallbacks[0]}{more}; choose a scheme whose block divides every row, "
                            "or drop --strict to fall back per tensor")
    for name, s in schemes.items():
        check_onnx_scheme(get_scheme(s), name)
    return schemes, fallbacks


def convert_to_onnx(
    model: Path,
    dest: Path,
    scheme: str,
    *,
    algorithm: str = "rtn",
    calib: Sequence[Path] = (),
    samples: int = CALIBRATION_SAMPLES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    strict: bool = False,
    accuracy_level: int = 4,
    float_dtype: str = "fp32",
    max_length: int | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    store: CodeStore | None = None,
    rtn: Callable[..., RTNStream] = RTNStream,
) -> tuple[Any, list[str]]:
    """Convert the checkpoint folder `model` into an ONNX folder at `dest` (atomic, deterministic)."""
    scheme = scheme.strip().lower()
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise QuantizeError(f"--accuracy-level {accuracy_level}: MatMulNBits takes 0-4 (4 = int8 activations)")
    if float_dtype not in FLOAT_DTYPES:
        raise QuantizeError(f"--float-dtype {float_dtype}: choose {' or '.join(FLOAT_DTYPES)}")
    ckpt = Checkpoint.open(model)
    config = ckpt.config
    schemes, fallbacks = onnx_schemes(ckpt, scheme, strict=strict)
    if algorithm != "rtn" and not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
    provenance = {
        "source": ckpt.path.resolve().name,
        "scheme": scheme,
        "algorithm": algorithm,
        "calibration_sha256": sha256_of(calib) if calib and algorithm != "rtn" else None,
        "calibration": {"samples": samples, "seq_len": seq_len} if algorithm != "rtn" else None,
        "schemes": dict(sorted(schemes.items())),
        "fallbacks": fallbacks,
    }
    stream = layer_ordered(weight_stream(ckpt, schemes, algorithm, calib, samples=samples, seq_len=seq_len,
                                         progress=progress, store=store, rtn=rtn), config)
    result = write_onnx_folder(dest, config, stream, ckpt.path,
                               options=GraphOptions(float_dtype=float_dtype, accuracy_level=accuracy_level),
                               provenance=provenance, max_length=max_length, overwrite=overwrite)
    return result, fallbacks
