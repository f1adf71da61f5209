"""How much memory a conversion will need, estimated from its plan before any work (`--max-memory`).

A run that is killed by the OOM killer an hour in wastes the hour and says nothing; a refusal up front says
what the plan needs and what would fit. The estimate is the peak resident set size (what `getrusage` and
`/usr/bin/time -v` report as maximum RSS, file-backed pages of the memory-mapped checkpoint included) as the
sum of parts that are resident at the same time, each a formula of the plan:

- `runtime`: the interpreter with NumPy, tokenizers, gguf, onnx and the C kernels loaded (measured);
- `tokenizer`: tokenizer.json as the GGUF export's Python lists, and as the tokenizers library's when
  calibration text is tokenized;
- `tensor`: the largest tensor while it is quantized: read from the checkpoint a block of rows at a time, so
  its codes (one byte per weight) and params, the packed bytes where the writer packs a whole tensor, and the
  block being read and converted;
- `calibration` (GPTQ/AWQ): per `quantize.calibrate`'s memory model, the current layer's hidden states
  (samples · seq_len · hidden · 4 B), the normed input in bfloat16, the attention output, the MLP activation
  in bfloat16; each worker's scratch (a batch's q/k/v product, or a block of tokens' gate/up product); the
  layer's codes with the largest group's dequantized and packed copies or GPTQ's working block of rows; the
  widest input group's float32 running Gram sums (one at 8B widths: it becomes the Hessian and GPTQ's inverse
  factor in place); for a GPTQ head (head grid under 8 bits) the head's float32 table and the final states;
- `writer`: what the output format keeps beyond one tensor (`qkiln quantize` keeps every tensor's codes until
  it writes the checkpoint, then dequantizes each; the others append as they go);
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
from qkiln.kernels.bf16 import NUMPY_CHUNK_FLOATS, bf16_path
from qkiln.model.config import LlamaConfig
from qkiln.model.names import expected_shapes
from qkiln.model.source import ROW_BLOCK_FLOATS
from qkiln.pipeline.gpu import plan_schemes
from qkiln.pipeline.onnx import onnx_schemes
from qkiln.pipeline.stream import calibration_tokens, read_calibration, tensor_schemes
from qkiln.quantize.awq import SEARCH_FLOATS, search_workers
from qkiln.quantize.gptq import GPTQ_ROW_FLOATS
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.sequential import sum_lanes

MB = 2**20
# Coefficients measured on this machine (AMD EPYC with AVX-512, no AMX; 2 cores), converting the demo model
# (SmolLM2-135M, F32) and a BF16 synth of its shape in a child process and tracing RSS per stage:
RUNTIME_BYTES = 80 * MB  # the `qkiln` process with its imports, the C kernels and the plan, before any tensor
GGUF_TOKENIZER_FACTOR = 7.0  # resident bytes per byte of tokenizer.json: the GGUF export's token/merge lists
HF_TOKENIZER_FACTOR = 15.0  # and the tokenizers library's, loaded to tokenize calibration text (twice when guarded)
QUANT_HELD = 1.6  # bytes per weight of a tensor being quantized (read a block of rows at a time): codes, params
BLOCK_SCRATCH = 6  # bytes per value of a block of rows written as it is made: float32 read, its converted output
ENGINE_BYTES = 35 * MB  # per calibration worker: its thread's arenas and packed-weight scratch
CODES_KEPT = 1.15  # bytes per quantized weight `qkiln quantize` holds until it writes: codes and block scales
DEQUANTIZE_BYTES = 8  # per weight of the tensor being dequantized for the write: two float32 temporaries
REFERENCE_FACTOR = 1.5  # build: the reference model cached in float32 with its fused copies, per float32 weight
ARTIFACT_RUN_FACTOR = 4.0  # build: the validated artifact in qkiln's runtime, llama.cpp and the speed loop
BATCH_SAMPLES = 8  # quantize.calibrate's batch_samples default: one batch per worker at a time
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
    # the path calibration's bfloat16 products take here (`kernels.bf16`): a C path (amx, avx512bf16) packs weights
    # in bfloat16 and forms the MLP activation and the Gram sums from its accumulators; numpy rounds into float32
    # copies and works a block of tokens at a time (convert_plan decides it)
    products: str = dataclasses.field(kw_only=True)


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
    """The largest tensor while it is quantized and packed (RTN, and the embedding of every algorithm): read from
    the checkpoint a block of rows at a time (`model.source.LazyRows`), so its codes and params (QUANT_HELD),
    plus its packed bytes where the writer packs a whole tensor (not GGUF); a tensor kept in float is a block
    of rows at a time in GGUF and the GPU folders, a float32 copy and its output elsewhere."""
    worst = 0.0
    for name, shape in _linear_shapes(plan.config).items():
        n = math.prod(shape)
        scheme = plan.schemes.get(name)
        if scheme is not None:
            held = n * (QUANT_HELD + (0.0 if plan.output == "gguf" else _packed_bytes_per_weight(scheme)))
        elif plan.output in ("gguf", *GPU_OUTPUTS):
            held = BLOCK_SCRATCH * min(n, ROW_BLOCK_FLOATS)  # converted and written a block of rows at a time
        else:
            held = n * (4 + _float_out_bytes(plan))
        worst = max(worst, held)
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
    # per worker: the attention step's q/k/v product and rotated copies (float32, a batch); on the numpy path
    # also the MLP's gate and up products of a block of tokens and the rounded input (`kernels.bf16`,
    # NUMPY_CHUNK_FLOATS), and a block of tokens widened for the Gram sum
    c_products = plan.products != "numpy"
    per_worker = batch_tokens * 4 * (2 * attn + 3 * kv)
    if not c_products:
        glu_tokens = min(batch_tokens, max(1, NUMPY_CHUNK_FLOATS // (2 * inter)))
        per_worker = max(per_worker, glu_tokens * 4 * (2 * inter + 2 * hidden)) + NUMPY_CHUNK_FLOATS * 4
    scratch = workers * per_worker
    layer_n = 2 * hidden * attn + 2 * hidden * kv + 3 * hidden * inter
    # the layer's codes (1 B per weight), and the largest of: gate/up dequantized (float32) and packed for the
    # forward (bfloat16 on a C path, float32 where the products run as BLAS on bf16-rounded values), or down_proj
    # dequantized with GPTQ's working copies of a block of rows (weights, their transpose, codes: ~2.5 floats
    # per weight)
    gate_up = 2 * hidden * inter
    layer = layer_n + max(gate_up * (4 + (2 if c_products else 4)),
                          hidden * inter * 4 + int(2.5 * 4 * min(GPTQ_ROW_FLOATS, hidden * inter)))
    awq_search = 0
    if plan.algorithm in ("awq", "awq+gptq"):
        layer += layer_n * 4 * 2  # AWQ reads the whole layer, and folds a copy
        # the scale search's jobs (quantize.awq.ScaleSearch): per worker, half a stage's candidates (at most 3) of
        # the largest linear stacked, capped by SEARCH_FLOATS, in ~6 float32 arrays (scaled weights, codes decoded,
        # divided back, error, products, the fit's temporaries): on the demo model AWQ+GPTQ peaked 0.11-0.14 GB
        # above GPTQ (bench/imatrix_bench.py), this part 0.13 GB
        w_size = max(hidden * inter, hidden * attn)
        awq_search = search_workers() * 6 * 4 * w_size * min(3, max(1, SEARCH_FLOATS // w_size))
    big = max(hidden, attn, inter)
    # the widest group's float32 running Gram sums (`quantize.sequential.sum_lanes`), the first of which becomes
    # the Hessian and GPTQ's inverse factor in place
    stats = big * big * 4 * min(batches, sum_lanes(big))
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
    return 0  # the others append as they go (formats.safetensors_folder spills to disk, never buffers a shard)


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
        phases.append(calib)
    if plan.output == "checkpoint":
        # it holds every tensor's codes, then writes each dequantized: two float32 temporaries of the largest
        largest = max(math.prod(s) for s in _linear_shapes(plan.config).values())
        phases = [{**ph, "writer": writer} for ph in phases]
        phases.append({"writer": writer, "dequantize on write": DEQUANTIZE_BYTES * largest})
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
                 schemes: Mapping[str, str] | None = None, calib_dtype: str = "bfloat16") -> Plan:
    """The plan of `qkiln convert --to output` (or, with output "checkpoint" and `schemes`, of `qkiln quantize`),
    with the grids chosen as the conversion will choose them (a bad scheme fails here, as it would there).
    `calib_dtype` float32 (`qkiln quantize --calib-dtype`) runs the products as float32 BLAS on float32 copies,
    which the NumPy path's formula models."""
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
                n, seq_len if n else 0, float_type, products=bf16_path() if calib_dtype == "bfloat16" else "numpy")


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
