"""Validate one artifact: accuracy through qkiln's runtime and the artifact's real runtime, the target-ISA
check, speed here and estimated for the target, and the threshold checks — what `qkiln validate` prints and
what `qkiln build` records per artifact.

The reference model's logits are computed once per evaluation and kept on disk (`ReferenceLogits`), so a
build with several artifacts runs the unquantized model once.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.errors import UserError
from qkiln.formats.gguf_model import load_gguf_model
from qkiln.kernels.speed import NoKernelError
from qkiln.pipeline.load import load_model
from qkiln.validate.evaluate import LogitsFn
from qkiln.validate.gates import Check, Thresholds, check_metrics, ppl_increase_pct
from qkiln.validate.isa_check import isa_check
from qkiln.validate.metrics import TokenScores
from qkiln.validate.speed import host_cost, measure_onnx_speed, measure_speed, target_estimate

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class ReferenceLogits:
    """The reference's logits per window (float32 .npy files in `workdir`, memory-mapped when read)."""

    def __init__(self, reference: LogitsFn, windows: np.ndarray, workdir: Path, progress: Progress | None = None):
        self.windows = windows  # (n, ctx) int64
        self.scores = TokenScores()
        self._dir = workdir
        t0 = time.perf_counter()
        for i, w in enumerate(windows):
            logits = np.asarray(reference(w[None, :])[0], dtype=np.float32)  # (ctx, vocab)
            np.save(workdir / f"ref{i}.npy", logits)
            self.scores.add_window(w, logits)
            if progress:
                progress("reference", i + 1, len(windows))
        self.seconds = time.perf_counter() - t0

    def __getitem__(self, i: int) -> np.ndarray:
        return np.load(self._dir / f"ref{i}.npy", mmap_mode="r")


def score(model: LogitsFn, ref: ReferenceLogits, *, label: str = "eval", progress: Progress | None = None,
          windows: int | None = None) -> tuple[dict[str, Any], float]:
    """Accuracy metrics of `model` against the reference on its first `windows` windows (all by default), and
    the model's seconds. The reference perplexity is over the same windows."""
    scores = TokenScores()
    ref_scores = ref.scores
    n = len(ref.windows) if windows is None else min(windows, len(ref.windows))
    if n < len(ref.windows):
        ref_scores = TokenScores()
        for i in range(n):
            ref_scores.add_window(ref.windows[i], ref[i])
    seconds = 0.0
    window_kl = []
    for i, w in enumerate(ref.windows[:n]):
        t0 = time.perf_counter()
        logits = model(w[None, :])[0]
        seconds += time.perf_counter() - t0
        before = scores.kl_sum
        scores.add_window(w, logits, ref[i])
        window_kl.append(round((scores.kl_sum - before) / (len(w) - 1), 6))
        if progress:
            progress(label, i + 1, n)
    d = scores.as_dict()
    d["windows"] = n
    d["window_mean_kl"] = window_kl  # per window: every window scores ctx - 1 tokens
    d["reference_perplexity"] = ref_scores.perplexity
    d["ppl_increase_pct"] = ppl_increase_pct(scores.perplexity, ref_scores.perplexity)
    return d, seconds


def llamacpp_logits(path: Path, ctx: int) -> LogitsFn | None:
    """ids (1, n) -> logits from llama.cpp (llama-cpp-python) on the file as it is; None when not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    import os

    llm = Llama(model_path=str(path), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True, verbose=False,
                n_threads=os.cpu_count() or 1, seed=0)
    return llamacpp_window_logits(llm)


def llamacpp_window_logits(llm: Any) -> LogitsFn:
    """ids (1, n) -> logits (1, n, vocab) from a loaded llama_cpp.Llama, the KV cache cleared before each window."""

    def run(ids: np.ndarray) -> np.ndarray:
        seq = [int(t) for t in ids[0]]
        llm.reset()
        llm.eval(seq)
        return np.array(llm.scores[: len(seq)], dtype=np.float32)[None]

    return run


def transformers_logits(path: Path, fmt: str) -> tuple[LogitsFn | None, str]:
    """ids (1, n) -> logits from transformers (CPU, float32) on a compressed-tensors / GPTQ folder as vLLM's
    loader reads it, or None and why it cannot run here. FP8 is decompressed to float32 at load
    (`CompressedTensorsConfig(dequantize=True)`): transformers' CPU W8A8 path emulates per-token FP8 activations,
    a GPU-only rounding qkiln's figures leave out, and takes minutes per window."""
    try:
        import torch
        import transformers
    except ImportError:
        return None, "transformers and torch are not installed (pip install transformers torch compressed-tensors)"
    kw: dict[str, Any] = {}
    if fmt == "compressed-tensors":
        try:
            import compressed_tensors  # noqa: F401
        except ImportError:
            return None, "the compressed-tensors package is not installed (pip install compressed-tensors)"
        kw["quantization_config"] = transformers.CompressedTensorsConfig(dequantize=True)
    else:
        try:
            import gptqmodel  # noqa: F401
        except ImportError:
            return None, ("transformers reads the GPTQ layout through GPTQModel, which is not installed (its CPU "
                          "build needs torch >= 2.14.1; this environment pins torch 2.13)")
    return torch_logits(transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()), ""


def torch_logits(model: Any) -> LogitsFn:
    """ids (b, n) -> float32 logits (b, n, vocab) of a transformers causal LM (no gradients)."""
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().numpy()

    return run


def cross_check(fn: LogitsFn, ref: ReferenceLogits, metrics: dict[str, Any], *, label: str, windows: int | None,
                progress: Progress | None) -> tuple[dict[str, Any], float]:
    """The artifact through its real runtime on the first `windows` windows, beside qkiln's on the same ones."""
    got, seconds = score(fn, ref, label=label, progress=progress, windows=windows)
    same = metrics["window_mean_kl"][: got["windows"]]
    return {"ran": True, **_round(got), "qkiln_mean_kl_same_windows": round(sum(same) / len(same), 6)}, seconds


@dataclasses.dataclass(frozen=True)
class TargetFacts:
    """What validation needs to know of a target (a recipe's [target] table, or `--target`)."""

    name: str
    qemu_cpu: str | None = None
    memory_bandwidth_gbs: float | None = None
    price_per_hour: float | None = None
    instance: str | None = None
    kind: str = "cpu"


def _round(d: dict[str, Any], digits: int = 6) -> dict[str, Any]:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in d.items()}


GGUF = "gguf"
GPU_FORMATS = ("compressed-tensors", "gptq")  # folders vLLM / transformers load
# Why a check does not apply to a folder artifact (ONNX, compressed-tensors, GPTQ).
NOT_GGUF_ISA = ("the target-ISA check runs qkiln's GGUF kernels under qemu; a {fmt} artifact runs on other "
                "kernels (not applicable)")
NOT_GGUF_LLAMACPP = "llama.cpp reads GGUF only (not applicable)"
NOT_MEASURED = {
    "compressed-tensors": "not measured here: a GPU format (vLLM on the target GPU); the CPU speed of this machine "
                          "says nothing of it",
    "gptq": "not measured here: a GPU format (vLLM on the target GPU); the CPU speed of this machine says nothing of it",
}


def validate_artifact(path: Path, ref: ReferenceLogits, thresholds: Thresholds, *, fmt: str = GGUF,
                      target: TargetFacts | None = None, isa_windows: int = 1, isa_ctx: int = 32,
                      speed_seconds: float = 0.5, real_runtime: bool = True, real_runtime_windows: int | None = None,
                      progress: Progress | None = None, workdir: Path | None = None) -> tuple[dict[str, Any], list[Check]]:
    """Every measurement of one artifact (`fmt`: gguf, onnx, compressed-tensors or gptq) and its checks.

    Accuracy is scored through qkiln's runtime for every format (`pipeline.load.load_model` opens ONNX folders
    through onnxruntime and compressed-tensors/GPTQ folders dequantized exactly). The real-runtime cross-check
    (llama.cpp), the target-ISA check under qemu run qkiln's GGUF kernels, so they apply to GGUF only; speed is
    measured for the CPU formats (GGUF on qkiln's kernels, ONNX through onnxruntime); for other formats the result says "not applicable"/"not measured" with the reason, and their
    thresholds are not gated. The result's "timings" and "speed" entries are the only ones that change between
    identical runs. llama.cpp runs on the first `real_runtime_windows` windows (all by default): it is the
    slowest step of a build."""
    gguf = fmt == GGUF
    if gguf and (not path.is_file() or path.suffix.lower() != ".gguf"):
        raise UserError(f"artifact {path}: a gguf artifact is a .gguf file")
    if not gguf and not path.is_dir():
        raise UserError(f"artifact {path}: a {fmt} artifact is a folder")
    name = path.name
    result: dict[str, Any] = {"runtime": "qkiln kernels (this machine)" if gguf else
                              ("onnxruntime (this machine)" if fmt == "onnx" else
                               "qkiln runtime on the dequantized weights (this machine)")}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    lm = load_gguf_model(path) if gguf else load_model(path)
    timings["load_s"] = time.perf_counter() - t0
    vocab = lm.model.config.vocab_size
    if vocab != ref[0].shape[-1]:
        raise UserError(f"{path} has vocabulary {vocab}, the reference {ref[0].shape[-1]}; "
                        "compare models that share a tokenizer")
    metrics, timings["qkiln_eval_s"] = score(lm.logits, ref, label=f"{name}: qkiln runtime", progress=progress)
    result["accuracy"] = _round(metrics)
    del lm
    if not gguf:
        result["llama_cpp"] = {"ran": False, "reason": NOT_GGUF_LLAMACPP.format(fmt=fmt)}
    elif real_runtime:
        fn = llamacpp_logits(path, ref.windows.shape[1])
        if fn is None:
            result["llama_cpp"] = {"ran": False, "reason": "llama-cpp-python is not installed"}
        else:
            result["llama_cpp"], timings["llama_cpp_eval_s"] = cross_check(
                fn, ref, metrics, label=f"{name}: llama.cpp", windows=real_runtime_windows, progress=progress)
    if fmt in GPU_FORMATS and real_runtime:
        if progress:
            progress(f"{name}: loading in transformers", 0, 1)
        tf, why = transformers_logits(path, fmt)
        if tf is None:
            result["transformers"] = {"ran": False, "reason": why}
        else:
            result["transformers"], timings["transformers_eval_s"] = cross_check(
                tf, ref, metrics, label=f"{name}: transformers", windows=real_runtime_windows, progress=progress)
    checked: dict[str, float | None] = dict(metrics)
    t = target
    if not gguf:
        thresholds = dataclasses.replace(thresholds, max_isa_kl=None)
        result["isa_check"] = {"ran": False, "reason": NOT_GGUF_ISA.format(fmt=fmt)}
    elif t is not None and t.qemu_cpu and isa_windows > 0:
        if progress:
            progress(f"{name}: target ISA under qemu -cpu {t.qemu_cpu}", 0, 1)
        t0 = time.perf_counter()
        tol = thresholds.max_isa_kl if thresholds.max_isa_kl is not None else 0.02
        isa = isa_check(path, ref.windows[:isa_windows, :isa_ctx], t.qemu_cpu, tolerance=tol, workdir=workdir)
        timings["isa_check_s"] = time.perf_counter() - t0
        result["isa_check"] = _round(isa.as_dict())
        checked["isa_mean_kl"] = isa.mean_kl
        if not isa.ran:
            thresholds = dataclasses.replace(thresholds, max_isa_kl=None)  # "not run" is reported, not gated
    else:
        thresholds = dataclasses.replace(thresholds, max_isa_kl=None)
        result["isa_check"] = {"ran": False, "reason": "the target names no qemu CPU (not an Arm CPU target)"
                               if t is not None else "no --target given"}
    timed = gguf or fmt == "onnx"  # the CPU runtimes; a GPU format's speed here says nothing of the GPU
    if not timed:
        # no honest speed figure: reported as not measured, and a speed floor is not gated
        thresholds = dataclasses.replace(thresholds, min_decode_tokens_per_s=None)
        result["speed"] = {"measured": False, "reason": NOT_MEASURED.get(fmt, "not measured here")}
    else:
        if progress:
            progress(f"{name}: speed", 0, 1)
        t0 = time.perf_counter()
        try:
            speed = measure_speed(path, seconds=speed_seconds) if gguf else measure_onnx_speed(path, seconds=speed_seconds)
        except NoKernelError as e:  # a weight type without a kernel: no honest figure (never another type's)
            timed = False
            thresholds = dataclasses.replace(thresholds, min_decode_tokens_per_s=None)
            result["speed"] = {"measured": False, "reason": str(e)}
        else:
            if t is not None and t.price_per_hour is not None:
                speed["usd_per_million_tokens_here_at_target_price"] = host_cost(speed, t.price_per_hour)
            result["speed"] = speed
            checked["decode_tokens_per_s"] = speed["decode_tokens_per_s"]
        timings["speed_s"] = time.perf_counter() - t0
    if timed and t is not None and t.memory_bandwidth_gbs:
        result["target_estimate"] = target_estimate(result["speed"], bandwidth_gbs=t.memory_bandwidth_gbs,
                                                    price_per_hour=t.price_per_hour, instance=t.instance)
    checks = check_metrics(name, checked, thresholds)
    result["checks"] = [c.as_dict() for c in checks]
    result["verdict"] = "pass" if all(c.passed for c in checks) else "fail"
    result["timings"] = _round(timings, 3)
    return result, checks


def reference_logits(reference: LogitsFn, windows: np.ndarray, progress: Progress | None = None) -> tuple[ReferenceLogits, Any]:
    """ReferenceLogits in a new temporary folder; the second value is the TemporaryDirectory to clean up."""
    tmp = tempfile.TemporaryDirectory(prefix="qkiln-ref-")
    return ReferenceLogits(reference, windows, Path(tmp.name), progress), tmp
