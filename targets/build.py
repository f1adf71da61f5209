"""`qkiln build RECIPE`: every artifact of a target, validated, with manifest.json, report.md/.html and a model
card per artifact, written into a temporary folder and moved into place only when complete.

Quantization goes through ONE function, `make_artifact`, which calls the pipeline's converter for the
artifact's format (`convert_to_gguf`, `convert_to_onnx`, `convert_to_gpu` for compressed-tensors and GPTQ);
artifacts with the same (format, scheme, algorithm, rules) are made once and copied, and artifacts of different
formats on the same scheme and algorithm share one quantization through a `pipeline.stream.CodeStore` (the
first one's codes recorded in the build's work folder, the others written from them — when every tensor's
grid agrees, which the store's key checks). A GGUF artifact is a file; the others are folders (sha256 over the
folder's files, size the sum of their sizes).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import qkiln
from qkiln.atomic import atomic_dir
from qkiln.errors import UserError
from qkiln.formats.hf import Checkpoint
from qkiln.hashing import sha256_of
from qkiln.pipeline.convert import convert_to_gguf
from qkiln.pipeline.gpu import convert_to_gpu
from qkiln.pipeline.load import load_model
from qkiln.pipeline.onnx import convert_to_onnx
from qkiln.pipeline.stream import CodeStore
from qkiln.targets.recipe import Artifact, Recipe
from qkiln.validate.artifact import TargetFacts, reference_logits, validate_artifact
from qkiln.validate.gates import Check
from qkiln.validate.manifest import artifact_size, folder_hashes, folder_sha256
from qkiln.validate.report import model_card, report_html, report_md
from qkiln.validate.windows import make_windows, read_text

# formats this qkiln can write -> the suffix of the artifact's name (GGUF: a file; the others: a folder NAME/)
WRITERS = {"gguf": ".gguf", "onnx": "", "compressed-tensors": "", "gptq": ""}
Progress = Callable[[str, int, int], None]  # (stage, done, total); total 0 = indeterminate


def check_buildable(recipe: Recipe) -> None:
    """Refuse, before any work, an artifact this qkiln cannot make (exit 2, naming it and why)."""
    for a in recipe.artifacts:
        if a.format not in WRITERS:
            raise UserError(f"{recipe.path}: artifact {a.name!r}: format {a.format} is not available yet in this "
                            f"qkiln (it writes {', '.join(WRITERS)}); remove the artifact or build it with a later qkiln")
        if a.rules:
            raise UserError(f"{recipe.path}: artifact {a.name!r}: per-tensor rules are not available yet for {a.format} "
                            "in this qkiln (only a scheme or a llama.cpp mix); remove `rules`")


def quantization_key(a: Artifact) -> tuple[Any, ...]:
    """Artifacts with equal keys have equal codes (same grid per tensor, same algorithm)."""
    return (a.format, a.scheme, a.algo, a.uniform, a.rules)


def shared_codes(artifacts: list[Artifact]) -> set[str]:
    """Names of the artifacts whose codes another format may reuse: same scheme, algorithm and rules as an
    artifact of another format (they record into the build's CodeStore; the rest need not)."""
    by: dict[tuple[Any, ...], set[str]] = {}
    for a in artifacts:
        by.setdefault((a.scheme, a.algo, a.uniform, a.rules), set()).add(a.format)
    return {a.name for a in artifacts if len(by[(a.scheme, a.algo, a.uniform, a.rules)]) > 1}


def make_artifact(model: Path, artifact: Artifact, dest: Path, recipe: Recipe,
                  progress: Callable[[str], None] | None = None, store: CodeStore | None = None) -> dict[str, Any]:
    """Quantize `model` as `artifact` says and write it at `dest`; returns the converter's summary with, for
    every format, "bits_per_weight", "tensor_types" and "fallbacks" (and "codes_from" when `store` held the
    codes already: the artifact that made them).

    The single call site of the format writers."""
    cal = recipe.calibration
    fmt = artifact.format
    common: dict[str, Any] = dict(algorithm=artifact.algo, calib=list(cal.text) if artifact.algo != "rtn" else [],
                                  samples=cal.samples, seq_len=cal.seq_len, progress=progress, store=store)
    if fmt == "gguf":
        summary = convert_to_gguf(model, dest, artifact.scheme, uniform=artifact.uniform, name=model.resolve().name,
                                  **common).summary()
    else:
        if fmt == "onnx":
            onnx, fallbacks = convert_to_onnx(model, dest, artifact.scheme, **common)  # accuracy_level 4 (its default)
            summary = onnx.summary()
            weight_bytes, types = summary["quantized_bytes"] + summary["float_bytes"], summary["tensor_kinds"]
        else:
            gpu = convert_to_gpu(model, dest, fmt, artifact.scheme, **common)
            summary = gpu.summary()
            weight_bytes, types, fallbacks = summary["bytes"], summary["schemes"], gpu.fallbacks
        # neither folder writer counts bits per weight: its weight bytes over the source's parameters (as GGUF's
        # figure, every tensor counts, float ones included)
        ckpt = Checkpoint.open(model)
        params = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names())
        summary = {**summary, "bits_per_weight": round(8 * weight_bytes / max(1, params), 4), "tensor_types": types,
                   "fallbacks": fallbacks}
    if store is not None and store.reused_from is not None:
        summary["codes_from"] = store.reused_from
    return summary


def eval_windows(reference_tokenize: Callable[[str], np.ndarray], recipe: Recipe) -> np.ndarray:
    text = "".join(read_text(p) for p in recipe.evaluation.text)
    return make_windows(reference_tokenize(text), recipe.evaluation.ctx, max_windows=recipe.evaluation.max_windows)


def recipe_doc(recipe: Recipe) -> dict[str, Any]:
    t = dataclasses.asdict(recipe.target)
    t["isa"] = list(recipe.target.isa)
    return {"file": recipe.path.name, "sha256": recipe.sha256, "target": t, "thresholds": recipe.thresholds.as_dict()}


def build(recipe: Recipe, model: Path, out: Path, *, progress: Progress | None = None,
          speed_seconds: float = 0.5, real_runtime: bool = True) -> tuple[dict[str, Any], list[Check]]:
    """Make, validate and report every artifact of `recipe` into `out` (atomically replaced when complete).

    Returns the manifest and every check; the caller turns failed checks into exit 1 (the output is written
    either way, so CI can upload the report of a failing build)."""
    check_buildable(recipe)
    say = progress or (lambda stage, done, total: None)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    t = recipe.target
    facts = TargetFacts(t.name, t.qemu_cpu, t.memory_bandwidth_gbs, t.price_per_hour, t.instance, t.kind)
    ref_model = load_model(model)
    windows = eval_windows(ref_model.encode, recipe)
    with atomic_dir(out, overwrite=True) as tmp:
        work = tmp / ".work"
        work.mkdir()
        made: dict[tuple[Any, ...], tuple[Path, dict[str, Any]]] = {}
        shared = shared_codes(recipe.artifacts)
        entries: list[dict[str, Any]] = []
        for i, a in enumerate(recipe.artifacts):
            dest = tmp / f"{a.name}{WRITERS[a.format]}"
            key = quantization_key(a)
            t0 = time.perf_counter()
            if key in made:  # same codes: quantize once, reuse
                if made[key][0].is_dir():
                    shutil.copytree(made[key][0], dest)
                else:
                    shutil.copyfile(made[key][0], dest)
                summary = {**made[key][1], "reused_from": made[key][0].name}
            else:
                say(f"quantize {a.name} ({a.scheme}, {a.algo})", i, len(recipe.artifacts))

                def step(what: str, label: str = f"quantize {a.name}") -> None:
                    say(f"{label}: {what}", 0, 0)

                store = CodeStore(work / "codes", label=a.name) if a.name in shared else None
                summary = make_artifact(model, a, dest, recipe, progress=step, store=store)
                made[key] = (dest, summary)
            timings[f"quantize_{a.name}_s"] = round(time.perf_counter() - t0, 3)
            entries.append({"name": a.name, "file": dest.name, "format": a.format, "scheme": a.scheme, "algo": a.algo,
                            "uniform": a.uniform, "sha256": folder_sha256(dest), "size_bytes": artifact_size(dest),
                            "bits_per_weight": summary["bits_per_weight"], "tensor_types": summary["tensor_types"],
                            "fallbacks": len(summary["fallbacks"]),
                            **({"files": folder_hashes(dest)} if dest.is_dir() else {}),
                            **({"warnings": summary["warnings"]} if summary.get("warnings") else {}),
                            **({k: summary[k] for k in ("reused_from", "codes_from") if k in summary}),
                            "thresholds": recipe.thresholds_for(a).as_dict()})
        t0 = time.perf_counter()
        ref, ref_tmp = reference_logits(ref_model.logits, windows, progress=lambda s, d, n: say(s, d, n))
        timings["reference_s"] = round(time.perf_counter() - t0, 3)
        del ref_model
        checks: list[Check] = []
        try:
            for a, entry in zip(recipe.artifacts, entries, strict=True):
                t0 = time.perf_counter()
                result, art_checks = validate_artifact(
                    tmp / entry["file"], ref, recipe.thresholds_for(a), fmt=a.format, target=facts,
                    isa_windows=recipe.evaluation.isa_windows, isa_ctx=recipe.evaluation.isa_ctx,
                    speed_seconds=speed_seconds, real_runtime=real_runtime and recipe.evaluation.real_runtime_windows > 0,
                    real_runtime_windows=recipe.evaluation.real_runtime_windows, progress=say, workdir=work)
                entry.update(result)
                entry["name"] = a.name
                checks += art_checks
                timings[f"validate_{a.name}_s"] = round(time.perf_counter() - t0, 3)
        finally:
            ref_tmp.cleanup()
        cal = recipe.calibration
        calibrated = any(a.algo != "rtn" for a in recipe.artifacts)
        manifest: dict[str, Any] = {
            "qkiln_version": qkiln.__version__,
            "recipe": recipe_doc(recipe),
            "model": {"name": model.resolve().name, "files": folder_hashes(model)},
            "seed": recipe.seed,
            "calibration": {
                "text": [p.name for p in cal.text], "sha256": sha256_of(cal.text), "samples": cal.samples,
                "seq_len": cal.seq_len, "used": calibrated,
                "description": (f"{cal.samples} x {cal.seq_len} tokens of {', '.join(p.name for p in cal.text)}"
                                if calibrated else "none (round-to-nearest needs no calibration)"),
            },
            "evaluation": {"text": [p.name for p in recipe.evaluation.text], "sha256": sha256_of(recipe.evaluation.text),
                           "ctx": recipe.evaluation.ctx, "windows": len(windows),
                           "reference_perplexity": round(ref.scores.perplexity, 6),
                           "isa_windows": recipe.evaluation.isa_windows, "isa_ctx": recipe.evaluation.isa_ctx,
                           "real_runtime_windows": recipe.evaluation.real_runtime_windows},
            "artifacts": entries,
            "verdict": "pass" if all(c.passed for c in checks) else "fail",
        }
        shutil.rmtree(work)
        for e in entries:
            (tmp / f"{e['name']}.md").write_text(model_card(manifest, e), encoding="utf-8")
        timings["total_s"] = round(time.perf_counter() - t_start, 3)
        manifest["timings"] = timings
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(report_md(manifest), encoding="utf-8")
        (tmp / "report.html").write_text(report_html(manifest), encoding="utf-8")
    return manifest, checks
