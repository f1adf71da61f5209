"""Checkpoint → GGUF: the library side of `qkiln convert --to gguf`.

Opens the checkpoint, lets the pipeline (`pipeline.stream`) choose each tensor's grid and quantize it
(RTN, GPTQ, AWQ), and hands the stream to the GGUF writer (`formats.gguf_write`), which checks the grids
are ones it stores and packs the codes as they are.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.formats.gguf_meta import Provenance
from qkiln.formats.gguf_write import FLOAT_TYPES, StreamWeights, TensorPlan, check_grids, write_llama_gguf
from qkiln.formats.hf import Checkpoint
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder
from qkiln.hashing import sha256_of
from qkiln.pipeline.stream import CodeStore, RTNStream, tensor_schemes, weight_stream
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN


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


def convert_to_gguf(
    model: Path,
    dest: Path,
    scheme: str,
    *,
    algorithm: str = "rtn",
    calib: Sequence[Path] = (),
    name: str | None = None,
    uniform: bool = False,
    samples: int = CALIBRATION_SAMPLES,
    seq_len: int = CALIBRATION_SEQ_LEN,
    progress: Callable[[str], None] | None = None,
    store: CodeStore | None = None,
    rtn: Callable[..., RTNStream] = RTNStream,
) -> ConvertResult:
    """Convert the checkpoint folder `model` into a llama.cpp GGUF at `dest` (atomic, deterministic)."""
    scheme = scheme.strip().lower()
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    ckpt = Checkpoint.open(model)
    config = ckpt.config
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    tokenizer = tokenizer_from_folder(ckpt.path, config.vocab_size, ids)
    fallbacks: list[str] = []
    schemes: dict[str, str] = {}
    if scheme in FLOAT_TYPES:
        if algorithm != "rtn":
            raise QuantizeError(f"--scheme {scheme} stores weights unquantized; --algo {algorithm} does not apply")
        stream: Any = RTNStream(ckpt, {}, progress)
    else:
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        schemes, fallbacks = tensor_schemes(config, shapes, scheme, uniform=uniform)
        check_grids(scheme, schemes)
        # a 2-D tensor no block fits stays F16, as llama.cpp keeps it
        stream = weight_stream(ckpt, schemes, algorithm, calib, samples=samples, seq_len=seq_len, progress=progress,
                               store=store, rtn=rtn)
    weights = StreamWeights(config, stream, schemes, scheme if scheme in FLOAT_TYPES else "f16")
    notes = {line.split(":", 1)[0]: line for line in fallbacks}
    prov = Provenance(
        name=name or ckpt.path.resolve().name,
        scheme=scheme,
        algorithm=algorithm if scheme not in FLOAT_TYPES else "none",
        calibration_sha256=sha256_of(calib) if calib and algorithm != "rtn" else None,
        source=ckpt.path.resolve().name,
        fallbacks=tuple(fallbacks),
        tokenizer_scores=tokenizer.scores_source,
    )
    plans = write_llama_gguf(dest, config, weights, tokenizer, prov, notes=notes)
    return ConvertResult(path=Path(dest), plans=plans, fallbacks=fallbacks)
