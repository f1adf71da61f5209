"""How much memory a conversion will need, estimated from its plan before any work (`--max-memory`).

A run that is killed by the OOM killer an hour in wastes the hour and says nothing; a refusal up front says
what the plan needs and what would fit. The estimate is the peak resident set size (what `getrusage` and
`/usr/bin/time -v` report as maximum RSS, file-backed pages of the memory-mapped checkpoint included) as the
sum of parts that are resident at the same time, each a formula of the plan:

- `runtime`: the interpreter with NumPy, tokenizers, gguf, onnx and the C kernels loaded (measured);
- `tokenizer`: tokenizer.json as the GGUF export's Python lists, and as the tokenizers library's when
  calibration text is tokenized;
- `tensor`: the largest tensor while it is read and quantized: float32 (a view of the mapped file for F32
  checkpoints, a widened copy for BF16/F16 ones, whose mapped pages are also resident during the read), its
  codes (one byte per weight), the packed bytes the writer makes, and RTN's chunk scratch;
- `calibration` (GPTQ/AWQ): per `quantize.calibrate`'s memory model, the current layer's hidden states
  (samples · seq_len · hidden · 4 B), the normed input in bfloat16, the attention output, the MLP activation
  in bfloat16; each worker's batch scratch (8 samples, about 2 · heads · seq_len floats per token, measured);
  the layer's weights in float32 with their codes and
  dequantized copies, the input group's float64 Hessian with its inverse and the running float32 sums; for
  a GPTQ head (head grid under 8 bits) the head's float32 table and the final states;
- `writer`: what the output format keeps beyond one tensor (the GPU safetensors folder buffers a shard;
  `qkiln quantize` keeps every tensor's codes until it writes the checkpoint, then dequantizes each);
- for `qkiln build`, the reference model's forward (the float32 model cached layer by layer, one window's
  logits) and the validation of the largest artifact, against which each artifact's conversion is compared:
  the build's peak is the largest of its phases.

The formulas' coefficients were measured (tests/pipeline/test_memory.py converts the demo model in a child
process and compares its peak RSS with the estimate); they model the code as it is, they do not change it.
"""

from __future__ import annotations

import dataclasses
import math
import os
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
from qkiln.quantize.awq import SEARCH_FLOATS, search_workers
from qkiln.quantize.registry import get_scheme

MB = 2**20
# Coefficients measured on this machine (AMD EPYC with AVX-512, no AMX; 2 cores), converting the demo model
# (SmolLM2-135M, F32) and a BF16 synth of its shape in a child process and tracing RSS per stage:
RUNTIME_BYTES = 80 * MB  # the `qkiln` process with its imports, the C kernels and the plan, before any tensor
GGUF_TOKENIZER_FACTOR = 7.0  # resident bytes per byte of tokenizer.json: the GGUF export's token/merge lists
HF_TOKENIZER_FACTOR = 15.0  # and the tokenizers library's, loaded to tokenize calibration text (twice when guarded)
QUANT_EXTRA = 0.6  # bytes per weight beyond its float32 while it is quantized and packed (codes, blocks)
MAPPED_READ = 0.53  # share of a BF16/F16 tensor's mapped pages resident while it is widened to float32
ENGINE_BYTES = 35 * MB  # per calibration worker: its thread's arenas and packed-weight scratch
CODES_KEPT = 1.15  # bytes per quantized weight `qkiln quantize` holds until it writes: codes and block scales
DEQUANTIZE_BYTES = 8  # per weight of the tensor being dequantized for the write: two float32 temporaries
REFERENCE_FACTOR = 1.5  # build: the reference model cached in float32 with its fused copies, per float32 weight
ARTIFACT_RUN_FACTOR = 4.0  # build: the validated artifact in qkiln's runtime, llama.cpp and the speed loop
BATCH_SAMPLES = 8  # quantize.calibrate's batch_samples default: one batch per worker at a time
SUM_LANES = 4  # quantize.sequential.SUM_LANES: running float32 Gram sums, one per lane in use
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
    float_type: str = "f32"  # how unquantized 2-D tensors are written (a GGUF float scheme: f32, f16, bf16)


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
    """The largest tensor while it is read, quantized and packed (RTN, and the embedding of every algorithm):
    float32 (a view of the mapped file for F32; for BF16/F16 a widened copy, with part of the mapped pages
    resident during the read), plus the codes and packed blocks, or the float copy the writer converts."""
    worst = 0.0
    for name, shape in _linear_shapes(plan.config).items():
        n = math.prod(shape)
        read = 4 + (MAPPED_READ * plan.source_bytes if plan.source_bytes != 4 else 0.0)
        scheme = plan.schemes.get(name)
        held = max(read, 4 + (QUANT_EXTRA if scheme is not None else _float_out_bytes(plan)))  # (float32, out)
        worst = max(worst, held * n)
    return int(worst)


def _float_out_bytes(plan: Plan) -> float:
    """Bytes per weight of a tensor written unquantized: a GGUF float type; 16-bit in the GPU folders."""
    if plan.output in GPU_OUTPUTS:
        return 2.0
    return {"f16": 2.0, "bf16": 2.0}.get(plan.float_type, 4.0)


def _calibration_part(plan: Plan) -> dict[str, int]:
    """Resident for calibrated algorithms, on top of the runtime: activations, batch scratch, one layer, the
    statistics, a GPTQ head (see quantize.calibrate's memory model; coefficients measured on this machine)."""
    cfg = plan.config
    if plan.algorithm == "rtn" or plan.samples == 0:
        return {}
    t = plan.samples * plan.seq_len  # tokens per layer pass
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    attn = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    # hidden states (float32), norm(h) (bfloat16), then the attention output (float32) / MLP activation (bf16)
    acts = t * (hidden * 4 + hidden * 2 + max(attn * 4, inter * 2))
    batches = -(-plan.samples // BATCH_SAMPLES)
    workers = min(os.cpu_count() or 1, batches)
    batch_tokens = min(plan.samples, BATCH_SAMPLES) * plan.seq_len
    # per token of a batch in flight: measured ~35 KB on the demo's shape (9 heads) and ~5 KB with 2 heads and a
    # 5x wider MLP, i.e. it follows heads x seq_len (attention's per-head rows), not the MLP width
    scratch = workers * batch_tokens * 4 * (2 * cfg.num_attention_heads * plan.seq_len + hidden + attn + 2 * kv)
    layer_n = 2 * hidden * attn + 2 * hidden * kv + 3 * hidden * inter
    layer = layer_n * (4 + 1) + hidden * inter * 4 * 2  # float32 + codes; dequantized group + GPTQ's work copy
    awq_search = 0
    if plan.algorithm in ("awq", "awq+gptq"):
        layer += layer_n * 4  # AWQ's folded copy of the layer
        # the scale search's jobs (quantize.awq.ScaleSearch): per worker, half a stage's candidates (at most 3) of
        # the largest linear stacked, capped by SEARCH_FLOATS, in ~6 float32 arrays (scaled weights, codes decoded,
        # divided back, error, products, the fit's temporaries): on the demo model AWQ+GPTQ peaked 0.11-0.14 GB
        # above GPTQ (bench/imatrix_bench.py), this part 0.13 GB
        w_size = max(hidden * inter, hidden * attn)
        awq_search = search_workers() * 6 * 4 * w_size * min(3, max(1, SEARCH_FLOATS // w_size))
    big = max(hidden, attn, inter)
    # the widest group's float64 Hessian, its damped inverse and Cholesky factor (measured 22-25 B per entry at
    # widths 1536, 8192 and 14336), and each further lane's float32 running sum
    stats = big * big * (8 * 3 + 4 * (min(batches, SUM_LANES) - 1))
    parts = {"calibration activations": acts, "calibration batch scratch": scratch, "calibration layer": layer,
             "calibration statistics": stats, "calibration engine": ENGINE_BYTES * workers}
    if awq_search:
        parts["awq scale search"] = awq_search
    head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    scheme = plan.schemes.get(head)
    if "gptq" in plan.algorithm and scheme is not None and getattr(get_scheme(scheme), "bits", 8) < 8:
        table = cfg.vocab_size * hidden
        parts["gptq head"] = table * 4 * 2 + t * hidden * 4 + hidden * hidden * 8 * 3  # table, work copy, states
    return parts


GPU_OUTPUTS = ("compressed-tensors", "gptq")


def _writer_part(plan: Plan) -> int:
    shapes = expected_shapes(plan.config)
    if plan.output == "checkpoint":  # qkiln quantize keeps every tensor's codes and scales until the write
        return int(sum(math.prod(s) * (CODES_KEPT if n in plan.schemes else 4) for n, s in shapes.items()))
    if plan.output in GPU_OUTPUTS:  # formats.safetensors_folder buffers up to one shard: packed, floats as 16-bit
        total = sum(math.prod(s) * (_packed_bytes_per_weight(plan.schemes[n]) if n in plan.schemes else 2.0)
                    for n, s in shapes.items())
        return int(min(total, 2 * 10**9))
    return 0  # gguf and onnx append one tensor at a time


def estimate_peak(plan: Plan) -> MemoryEstimate:
    """The plan's estimated peak RSS, with its parts (see the module docstring): the runtime and tokenizer, then
    the largest of the phases that are not resident together — the largest tensor being quantized (the
    embedding, first), the layer pass of calibration, and what the writer has accumulated by the end."""
    tokenizer = (GGUF_TOKENIZER_FACTOR if plan.output == "gguf" else 0.0) + (HF_TOKENIZER_FACTOR if plan.samples else 0.0)
    base: dict[str, int] = {"runtime": RUNTIME_BYTES, "tokenizer": int(plan.tokenizer_bytes * tokenizer)}
    tensor = _tensor_part(plan)
    calib = _calibration_part(plan)
    writer = _writer_part(plan)
    phases: list[dict[str, int]] = [{"largest tensor": tensor}]
    if calib:
        phases.append(calib if plan.output not in GPU_OUTPUTS else {**calib, "writer": writer})
    if plan.output == "checkpoint":
        # it holds every tensor's codes, then writes each dequantized: two float32 temporaries of the largest
        largest = max(math.prod(s) for s in _linear_shapes(plan.config).values())
        phases = [{**ph, "writer": writer} for ph in phases]
        phases.append({"writer": writer, "dequantize on write": DEQUANTIZE_BYTES * largest})
    elif plan.output in GPU_OUTPUTS:
        # the buffered shard at the end, with an untied head (the last tensor) being packed
        head = 0 if plan.config.tie_word_embeddings else tensor
        phases.append({"writer": writer, **({"largest tensor": head} if head else {})})
    worst: dict[str, int] = max(phases, key=lambda ph: sum(ph.values()))
    parts = {**base, **worst}
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
    float_type = scheme.strip().lower() if output == "gguf" and scheme.strip().lower() in FLOAT_TYPES else "f32"
    return Plan(config, source_bytes, tok.stat().st_size if tok.is_file() else 0, output, dict(schemes), algorithm,
                n, seq_len if n else 0, float_type)


def build_estimate(plans: Sequence[Plan], eval_ctx: int) -> MemoryEstimate:
    """`qkiln build`'s peak: the largest of each artifact's conversion and the validation.

    Measured on one build (graviton4's recipe cut to one Q4_0 RTN artifact of the demo model, 1563 MiB, traced
    per stage): the process does not return the reference pass's memory before it validates, so the validation
    phase is the reference model cached as it runs (float32, the fused q/k/v and gate/up copies beside the
    mapped weights: 1.5 x 4 bytes per parameter), one window's logits and activations, and the artifact being
    run through qkiln's runtime, llama.cpp and the speed loop (about 4 x its packed size). Unmeasured on other
    recipes and models: a coarser estimate than a single conversion's."""
    assert plans, "a recipe has at least one artifact"
    convs = [estimate_peak(p) for p in plans]
    cfg = plans[0].config
    n_params = sum(math.prod(s) for s in expected_shapes(cfg).values())
    window = eval_ctx * (cfg.vocab_size * 4 * 2 + cfg.intermediate_size * 4 * 3 + cfg.hidden_size * 4 * 4)
    artifact = max(sum(math.prod(s) * _packed_bytes_per_weight(p.schemes.get(n))
                       for n, s in expected_shapes(cfg).items()) for p in plans)
    validation = {"runtime": RUNTIME_BYTES, "tokenizer": int(plans[0].tokenizer_bytes * HF_TOKENIZER_FACTOR),
                  "reference model (float32)": int(n_params * 4 * REFERENCE_FACTOR), "evaluation window": window,
                  "artifact under validation": int(artifact * ARTIFACT_RUN_FACTOR)}
    phases = [*convs, MemoryEstimate(sum(validation.values()), dict(sorted(validation.items(), key=lambda kv: -kv[1])))]
    return max(phases, key=lambda e: e.total)
