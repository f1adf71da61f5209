"""How much memory a conversion will need, estimated from its plan before any work (`--max-memory`).

A run that is killed by the OOM killer an hour in wastes the hour and says nothing; a refusal up front says
what the plan needs and what would fit. The estimate is the peak resident set size (what `getrusage` and
`/usr/bin/time -v` report as maximum RSS, file-backed pages of the memory-mapped checkpoint included) as the
sum of parts that are resident at the same time, each a formula of the plan:

- `runtime`: the interpreter with NumPy, tokenizers, gguf, onnx and the C kernels loaded (measured);
- `tokenizer`: tokenizer.json parsed twice (the tokenizers library's and the GGUF export's Python lists);
- `tensor`: the largest tensor while it is read and quantized: float32 (a view of the mapped file for F32
  checkpoints, a widened copy for BF16/F16 ones, whose mapped pages are also resident during the read), its
  codes (one byte per weight), the packed bytes the writer makes, and RTN's chunk scratch;
- `calibration` (GPTQ/AWQ): per `quantize.calibrate`'s memory model, the current layer's hidden states
  (samples · seq_len · hidden · 4 B), the normed input in bfloat16, the attention output, the MLP activation
  in bfloat16, the layer's weights in float32 with their codes and dequantized copies, the input group's
  float64 Hessian with its inverse and the running float32 sums; for a GPTQ head (head grid under 8 bits)
  the head's float32 table and the final states;
- `writer`: what the output format keeps beyond one tensor (the GPU safetensors folder buffers a shard;
  `qkiln quantize` keeps every tensor's codes until it writes the checkpoint);
- for `qkiln build`, the reference model's forward (the float32 model cached layer by layer, one window's
  logits) and the validation of the largest artifact, against which each artifact's conversion is compared:
  the build's peak is the largest of its phases.

The formulas' coefficients were measured (tests/pipeline/test_memory.py converts the demo model in a child
process and compares its peak RSS with the estimate); they model the code as it is, they do not change it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qkiln.errors import UserError
from qkiln.formats.gguf_write import FLOAT_TYPES
from qkiln.formats.hf import Checkpoint
from qkiln.model.config import LlamaConfig
from qkiln.model.names import expected_shapes
from qkiln.pipeline.gpu import plan_schemes
from qkiln.pipeline.onnx import onnx_schemes
from qkiln.pipeline.stream import calibration_tokens, read_calibration, tensor_schemes
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import CHUNK_ELEMS

MB = 2**20
# Measured on this machine: `python -c 'import qkiln.cli.main'`-level imports plus the kernels library and the
# BLAS thread buffers, the RSS before the first tensor is read.
RUNTIME_BYTES = 150 * MB
TOKENIZER_FACTOR = 12.0  # resident bytes per byte of tokenizer.json (two parses: Rust and Python)
RTN_WORKERS = 2  # quantize_rtn's thread pool on this many cores (min(cpu_count, 4))
SCRATCH_PER_CHUNK = 4 * 4  # bytes per chunk element: the float32 chunk and the grid's temporaries

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_size(text: str, option: str = "--max-memory") -> int:
    """Bytes of a size such as `3GB`, `2.5GiB`, `800MB`, `512M` or `1000000` (decimal units: GB = 10^9 B;
    binary with an i: GiB = 2^30 B)."""
    m = _SIZE.match(text or "")
    unit = (m.group(2) or "").lower() if m else ""
    if not m or unit not in _UNITS:
        raise UserError(f"{option} {text!r} is not a size; write e.g. 3GB, 2.5GiB or 800MB")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise UserError(f"{option} {text!r} must be positive")
    return int(value)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MB:.0f} MiB"


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run will do, as far as memory is concerned."""

    config: LlamaConfig
    source_bytes: int  # bytes per weight stored in the checkpoint: 4 (F32), 2 (BF16/F16)
    tokenizer_bytes: int  # size of tokenizer.json
    output: str  # gguf | onnx | compressed-tensors | gptq | checkpoint (qkiln quantize's simulated folder)
    schemes: Mapping[str, str]  # tensor -> scheme name; absent: kept in float
    algorithm: str  # rtn | gptq | awq | awq+gptq
    samples: int = 0  # calibration windows that will really be used (0 for rtn)
    seq_len: int = 0


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak RSS in bytes as the sum of `parts` (name -> bytes), largest first."""

    total: int
    parts: dict[str, int]

    def biggest(self, n: int = 3) -> str:
        return ", ".join(f"{k} {fmt_bytes(v)}" for k, v in list(self.parts.items())[:n])

    def as_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total, "parts": dict(self.parts)}


def _packed_bytes_per_weight(scheme: str | None) -> float:
    if scheme is None:
        return 4.0  # kept in float: written as F32/F16, at most one float32 copy more
    bits = getattr(get_scheme(scheme), "bits", 8)
    return bits / 8 + 0.25  # codes packed, plus scales and mins per block (a quarter byte per weight covers Q*_K)


def _linear_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """The 2-D tensors as stored (a tied head is the embedding, read once)."""
    return {n: s for n, s in expected_shapes(cfg).items() if len(s) == 2}


def _tensor_part(plan: Plan) -> int:
    """The largest tensor while it is read, quantized and packed (RTN, and the embedding of every algorithm)."""
    worst = 0
    for name, shape in _linear_shapes(plan.config).items():
        n = math.prod(shape)
        scheme = plan.schemes.get(name)
        read = 4 * n + (plan.source_bytes * n if plan.source_bytes != 4 else 0)  # float32 + mapped pages (BF16)
        if scheme is None:
            held = read + 4 * n  # the float copy the writer converts from
        else:
            held = read + n + _packed_bytes_per_weight(scheme) * n  # codes + packed
        worst = max(worst, int(held))
    return worst


def _calibration_part(plan: Plan) -> dict[str, int]:
    """Resident for calibrated algorithms, on top of the runtime: activations, one layer, statistics."""
    cfg = plan.config
    if plan.algorithm == "rtn" or plan.samples == 0:
        return {}
    t = plan.samples * plan.seq_len  # tokens per layer pass
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    attn = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    acts = t * hidden * 4 + t * hidden * 2 + max(t * attn * 4, t * inter * 2)
    layer_n = 2 * hidden * attn + 2 * hidden * kv + 3 * hidden * inter
    layer = layer_n * (4 + 1) + hidden * inter * 4 * 2  # float32 + codes; dequantized group + GPTQ's work copy
    if plan.algorithm in ("awq", "awq+gptq"):
        layer += layer_n * 4  # AWQ's folded copy of the layer
    big = max(hidden, attn, inter)
    stats = big * big * (8 * 3 + 4 * 4)  # float64 Hessian, its damped inverse and Cholesky; SUM_LANES float32 sums
    parts = {"calibration activations": acts, "calibration layer": layer, "calibration statistics": stats}
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    scheme = plan.schemes.get(head)
    if "gptq" in plan.algorithm and scheme is not None and getattr(get_scheme(scheme), "bits", 8) < 8:
        table = cfg.vocab_size * hidden
        parts["gptq head"] = table * 4 * 2 + t * hidden * 4 + hidden * hidden * 8 * 3  # table, work copy, states
    return parts


def _writer_part(plan: Plan) -> int:
    shapes = expected_shapes(plan.config)
    if plan.output == "checkpoint":  # qkiln quantize keeps every tensor's codes (or float) until the write
        return int(sum(math.prod(s) * (1 if n in plan.schemes else 4) for n, s in shapes.items()))
    if plan.output in ("compressed-tensors", "gptq"):  # formats.safetensors_folder buffers up to one shard
        total = sum(math.prod(s) * _packed_bytes_per_weight(plan.schemes.get(n)) for n, s in shapes.items())
        return int(min(total, 2 * 10**9))
    return 0  # gguf and onnx append one tensor at a time


def estimate_peak(plan: Plan) -> MemoryEstimate:
    """The plan's estimated peak RSS, with its parts (see the module docstring)."""
    parts: dict[str, int] = {"runtime": RUNTIME_BYTES, "tokenizer": int(plan.tokenizer_bytes * TOKENIZER_FACTOR)}
    tensor = _tensor_part(plan) + RTN_WORKERS * CHUNK_ELEMS * SCRATCH_PER_CHUNK
    calib = _calibration_part(plan)
    # The largest tensor (the embedding, read before layer 0) and the layer pass are not resident together;
    # a GPTQ head is computed before the embedding is packed, so it stands with the activations.
    if sum(calib.values()) > tensor:
        parts.update(calib)
    else:
        parts["largest tensor"] = tensor
    writer = _writer_part(plan)
    if writer:
        parts["writer"] = writer
    ordered = dict(sorted(parts.items(), key=lambda kv: -kv[1]))
    return MemoryEstimate(sum(ordered.values()), ordered)


def _estimate(plans: Sequence[Plan], eval_ctx: int | None) -> MemoryEstimate:
    return build_estimate(plans, eval_ctx) if eval_ctx is not None else estimate_peak(plans[0])


def _with_samples(plans: Sequence[Plan], n: int) -> list[Plan]:
    return [dataclasses.replace(p, samples=min(n, p.samples)) if p.algorithm != "rtn" else p for p in plans]


def samples_that_fit(plans: Sequence[Plan], limit: int, eval_ctx: int | None = None) -> int:
    """The most calibration windows (0: none) whose estimate stays within `limit`."""
    hi = max(p.samples for p in plans)
    if _estimate(_with_samples(plans, 1), eval_ctx).total > limit:
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _estimate(_with_samples(plans, mid), eval_ctx).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_memory(plan: Plan | Sequence[Plan], limit: int | None, *, eval_ctx: int | None = None) -> MemoryEstimate:
    """The estimate of one conversion's plan, or with `eval_ctx` of a build's (`build_estimate`); a UserError
    (exit 2) when it exceeds `limit`, saying what would fit."""
    plans = [plan] if isinstance(plan, Plan) else list(plan)
    est = _estimate(plans, eval_ctx)
    if limit is None or est.total <= limit:
        return est
    hints = []
    calibrated = [p for p in plans if p.algorithm != "rtn"]
    if calibrated:
        n = samples_that_fit(plans, limit, eval_ctx)
        if 0 < n < max(p.samples for p in calibrated):
            hints.append(f"--samples {n} fits" if eval_ctx is None else f"[calibration] samples = {n} fits")
        rtn = _estimate([dataclasses.replace(p, algorithm="rtn", samples=0) for p in plans], eval_ctx)
        if rtn.total <= limit:
            hints.append(f"--algo rtn needs {fmt_bytes(rtn.total)}" if eval_ctx is None
                         else f"algo = \"rtn\" needs {fmt_bytes(rtn.total)}")
    if not hints:
        floor = _estimate([dataclasses.replace(p, algorithm="rtn", samples=0) for p in plans], eval_ctx)
        hints.append(f"nothing in this plan fits below {fmt_bytes(floor.total)}; "
                     "raise --max-memory or use a machine with more memory")
    raise UserError(f"estimated peak memory {fmt_bytes(est.total)} exceeds --max-memory {fmt_bytes(limit)} "
                    f"(biggest parts: {est.biggest()}); {'; '.join(hints)}. Nothing was written.")


def calibration_samples(ckpt: Checkpoint, calib: Sequence[Path], samples: int, seq_len: int) -> int:
    """The windows calibration will really use: the text may hold fewer than asked (tokenizing is cheap)."""
    if not calib:
        return 0
    return min(samples, len(calibration_tokens(ckpt, read_calibration(calib))) // seq_len)


def convert_plan(ckpt: Checkpoint, output: str, scheme: str, algorithm: str, calib: Sequence[Path], samples: int,
                 seq_len: int, *, uniform: bool = False, strict: bool = False,
                 schemes: Mapping[str, str] | None = None) -> Plan:
    """The plan of `qkiln convert --to output` (or, with output "checkpoint" and `schemes`, of `qkiln quantize`),
    with the grids chosen as the conversion will choose them (a bad scheme fails here, as it would there)."""
    config = ckpt.config
    shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    if schemes is None:
        scheme = scheme.strip().lower()
        if output == "gguf":
            schemes = {} if scheme in FLOAT_TYPES else tensor_schemes(config, shapes, scheme, uniform=uniform)[0]
        elif output == "onnx":
            schemes = onnx_schemes(ckpt, scheme, strict=strict)[0]
        else:
            schemes = {n: s.name for n, s in plan_schemes(ckpt, scheme, output)[0].items()}
    source_bytes = {"F32": 4, "F16": 2, "BF16": 2}[ckpt.dtype("model.embed_tokens.weight")]
    tok = ckpt.path / "tokenizer.json"
    n = calibration_samples(ckpt, calib, samples, seq_len) if algorithm != "rtn" else 0
    return Plan(config, source_bytes, tok.stat().st_size if tok.is_file() else 0, output, dict(schemes), algorithm,
                n, seq_len if n else 0)


def build_estimate(plans: Sequence[Plan], eval_ctx: int) -> MemoryEstimate:
    """`qkiln build`'s peak: the largest of its phases — each artifact's conversion, and the validation (the
    reference's float32 model, cached as it runs, with one window's logits and activations, while the evaluated
    artifact is loaded; the reference model stays loaded through the conversions but caches nothing until the
    reference pass)."""
    assert plans, "a recipe has at least one artifact"
    convs = [estimate_peak(p) for p in plans]
    cfg = plans[0].config
    n_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
    window = eval_ctx * (cfg.vocab_size * 4 * 2 + cfg.intermediate_size * 4 * 3 + cfg.hidden_size * 4 * 4)
    artifact = max(sum(math.prod(s) * _packed_bytes_per_weight(p.schemes.get(n))
                       for n, s in expected_shapes(cfg).items()) for p in plans)
    validation = {"runtime": RUNTIME_BYTES, "tokenizer": int(plans[0].tokenizer_bytes * TOKENIZER_FACTOR),
                  "reference model (float32)": n_params * 4, "evaluation window": window,
                  "artifact under validation": int(artifact)}
    phases = [*convs, MemoryEstimate(sum(validation.values()), dict(sorted(validation.items(), key=lambda kv: -kv[1])))]
    return max(phases, key=lambda e: e.total)
