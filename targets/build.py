"""`qkiln build RECIPE`: every artifact of a target, validated, with manifest.json, report.md/.html and a model
card per artifact, written into a temporary folder and moved into place only when complete.

The artifacts are made first (`targets.make`: here, or as Ray tasks with `ray`, same bytes), then validated
here, one after the other, after every task has finished and the Ray session is closed: speed figures are
never measured while other work competes for the machine. A folder artifact's sha256 is over its files, its
size the sum of their sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import qkiln
from qkiln.atomic import atomic_dir
from qkiln.hashing import sha256_of
from qkiln.pipeline.load import load_model
from qkiln.pipeline.ray_tasks import RayOptions
from qkiln.targets.make import WRITERS, Progress, check_buildable, code_groups, make_groups
from qkiln.targets.recipe import Recipe
from qkiln.validate.artifact import TargetFacts, reference_logits, validate_artifact
from qkiln.validate.gates import Check
from qkiln.validate.manifest import artifact_size, folder_hashes, folder_sha256
from qkiln.validate.report import model_card, report_html, report_md
from qkiln.validate.windows import make_windows, read_text


def eval_windows(reference_tokenize: Callable[[str], np.ndarray], recipe: Recipe) -> np.ndarray:
    text = "".join(read_text(p) for p in recipe.evaluation.text)
    return make_windows(reference_tokenize(text), recipe.evaluation.ctx, max_windows=recipe.evaluation.max_windows)


def recipe_doc(recipe: Recipe) -> dict[str, Any]:
    t = dataclasses.asdict(recipe.target)
    t["isa"] = list(recipe.target.isa)
    return {"file": recipe.path.name, "sha256": recipe.sha256, "target": t, "thresholds": recipe.thresholds.as_dict()}


def build(recipe: Recipe, model: Path, out: Path, *, progress: Progress | None = None,
          speed_seconds: float = 0.5, real_runtime: bool = True,
          ray: RayOptions | None = None) -> tuple[dict[str, Any], list[Check]]:
    """Make, validate and report every artifact of `recipe` into `out` (atomically replaced when complete);
    with `ray`, the artifacts are made as Ray tasks (`make_groups`), same bytes.

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
        made = make_groups(model.resolve(), code_groups(recipe.artifacts), work, recipe, say, ray)
        entries: list[dict[str, Any]] = []
        for a in recipe.artifacts:
            made_in, summary, seconds = made[a.name]
            dest = tmp / f"{a.name}{WRITERS[a.format]}"
            os.replace(made_in, dest)
            timings[f"quantize_{a.name}_s"] = seconds
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
