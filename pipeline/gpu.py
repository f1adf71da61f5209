"""Checkpoint → GPU-serving safetensors (`qkiln convert --to compressed-tensors|gptq`).

The writers (`compressed_tensors_write`, `gptq_write`) take the quantizer's stream of (hf_name,
QuantizedTensor | float32 array) in layer order, from `pipeline.stream.layer_ordered`.
Every refusal (a grid the format cannot hold, mixed grids in the GPTQ layout, missing calibration)
happens before any quantization work.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qkiln.errors import QuantizeError
from qkiln.formats import compressed_tensors_write as ct
from qkiln.formats import gptq_write
from qkiln.formats.compressed_tensors_write import is_decoder_linear, write_compressed_tensors
from qkiln.formats.gptq_write import marlin_warning, write_gptq
from qkiln.formats.hf import Checkpoint
from qkiln.hashing import sha256_of
from qkiln.pipeline.stream import CodeStore, RTNStream, layer_ordered, tensor_schemes, weight_stream
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.scheme import Scheme

TARGETS = ("compressed-tensors", "gptq")


@dataclasses.dataclass
class GpuConvertResult:
    path: Path
    target: str
    schemes: dict[str, str]
    fallbacks: list[str]
    warnings: list[str]

    def summary(self) -> dict[str, Any]:
        files = sorted(self.path.glob("*.safetensors"))
        by: dict[str, int] = {}
        for s in self.schemes.values():
            by[s] = by.get(s, 0) + 1
        return {
            "path": str(self.path),
            "format": self.target,
            "shards": [f.name for f in files],
            "bytes": sum(f.stat().st_size for f in files),
            "schemes": dict(sorted(by.items())),
            "fallbacks": self.fallbacks,
            "warnings": self.warnings,
        }


def plan_schemes(ckpt: Any, scheme: str, target: str) -> tuple[dict[str, Scheme], list[str]]:
    """The grid of each decoder Linear (embeddings, norms and lm_head stay float) and the fallbacks
    taken; refuses grids the target cannot hold."""
    if target not in TARGETS:
        raise QuantizeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    check = ct.check_scheme if target == "compressed-tensors" else gptq_write.check_scheme
    check(get_scheme(scheme))
    shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    names, fallbacks = tensor_schemes(ckpt.config, shapes, scheme, uniform=True)
    chosen = {n: get_scheme(s) for n, s in names.items() if is_decoder_linear(n)}
    fallbacks = [f for f in fallbacks if is_decoder_linear(f.split(":", 1)[0])]
    for s in {s.name: s for s in chosen.values()}.values():
        check(s)
    if not chosen:
        raise QuantizeError(f"{scheme} fits none of the model's Linear layers")
    if target == "gptq" and len({s.name for s in chosen.values()}) > 1:
        used = sorted({s.name for s in chosen.values()})
        raise QuantizeError(
            f"{scheme} does not divide every row ({fallbacks[0]}); the GPTQ layout has one group size per model "
            f"(this one would need {', '.join(used)}): choose a group size that divides every input dimension"
        )
    return chosen, fallbacks


def model_card(target: str, scheme: str, algorithm: str, calib: Sequence[Path], source: str,
               fallbacks: list[str], qconfig: dict[str, Any], extra: str = "") -> str:
    """README.md: what the artifact is, how it was made, and how to check its accuracy."""
    calib_line = (f"{', '.join(p.name for p in calib)} (sha256 {sha256_of(calib)})" if calib and algorithm != "rtn"
                  else "none (RTN needs no calibration)")
    fb = "\n".join(f"- {f}" for f in fallbacks) or "- none"
    return f"""---
library_name: transformers
tags: [qkiln, {target}, {scheme}]
---
# {source} — {scheme} ({target})

Made by qkiln from `{source}`.

- format: {target} ({'vLLM, SGLang, transformers + compressed-tensors' if target == 'compressed-tensors' else 'vLLM gptq / gptq_marlin, GPTQModel'})
- scheme: `{scheme}` on every decoder Linear; embeddings, norms and lm_head in float16
- algorithm: `{algorithm}`
- calibration: {calib_line}
- accuracy: not measured at conversion; run `qkiln eval --model THIS_FOLDER --ref {source} --text FILE`
  (perplexity, KL divergence, top-1 agreement against the original)

Fallbacks (a group that does not divide a row takes the next smaller group; qkiln never writes a partial group):
{fb}
{extra}
quantization_config:

```json
{json.dumps(qconfig, indent=2, sort_keys=True)}
```
"""


def convert_to_gpu(
    model: Path, dest: Path, target: str, scheme: str, *, algorithm: str = "rtn", calib: Sequence[Path] = (),
    samples: int = CALIBRATION_SAMPLES, seq_len: int = CALIBRATION_SEQ_LEN, overwrite: bool = False,
    progress: Callable[[str], None] | None = None, shard_bytes: int | None = None, store: CodeStore | None = None,
    rtn: Callable[..., RTNStream] = RTNStream,
) -> GpuConvertResult:
    """Convert the checkpoint `model` into a `target` folder at `dest` (atomic, deterministic)."""
    if algorithm not in ALGORITHMS:
        raise QuantizeError(f"unknown algorithm {algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if algorithm != "rtn" and not calib:
        raise QuantizeError(f"--algo {algorithm} needs calibration text: pass --calib FILE")
    ckpt = Checkpoint.open(model)
    scheme = scheme.strip().lower()
    schemes, fallbacks = plan_schemes(ckpt, scheme, target)
    warnings: list[str] = []
    if target == "gptq":
        grid = gptq_write.check_scheme(next(iter(schemes.values())))
        w = marlin_warning(grid, [tuple(ckpt.shape(n)) for n in schemes])  # type: ignore[misc]
        if w:
            warnings.append(w)
    stream = layer_ordered(weight_stream(ckpt, {n: s.name for n, s in schemes.items()}, algorithm, calib,
                                         samples=samples, seq_len=seq_len, progress=progress, store=store, rtn=rtn),
                          ckpt.config)
    source = ckpt.path.resolve().name
    extra = "".join(f"\nWarning: {w}\n" for w in warnings)

    def card(qconfig: dict[str, Any]) -> str:
        return model_card(target, scheme, algorithm, calib, source, fallbacks, qconfig, extra)

    writer = write_compressed_tensors if target == "compressed-tensors" else write_gptq
    writer(dest, stream, ckpt.config, tokenizer_from=ckpt.path, card=card, overwrite=overwrite, shard_bytes=shard_bytes)
    return GpuConvertResult(Path(dest), target, {n: s.name for n, s in schemes.items()}, fallbacks, warnings)
