"""The artifacts of a recipe, made (quantized and written) without validation: what `qkiln build` runs first,
here or as Ray tasks, and all a Ray worker imports for it (no validation, reports or plots).

Quantization goes through ONE function, `make_artifact`, which calls the pipeline's converter for the
artifact's format (`convert_to_gguf`, `convert_to_onnx`, `convert_to_gpu` for compressed-tensors and GPTQ);
artifacts with the same (format, scheme, algorithm, rules) are made once and copied, and artifacts of different
formats on the same scheme and algorithm share one quantization through a `pipeline.stream.CodeStore` (the
first one's codes recorded in the group's folder, the others written from them — when every tensor's grid
agrees, which the store's key checks). A GGUF artifact is a file; the others are folders.

The artifacts that may share codes form a group (`code_groups`), made in recipe order by `make_group` in a
folder of its own; groups share nothing, so under `--ray` each group is one Ray task (and its RTN tensors
tasks of their own, `pipeline.ray_tasks.RayRTNStream`), with the same bytes.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.errors import UserError
from qkiln.formats.hf import Checkpoint
from qkiln.pipeline.convert import convert_to_gguf
from qkiln.pipeline.gpu import convert_to_gpu
from qkiln.pipeline.onnx import convert_to_onnx
from qkiln.pipeline.ray_tasks import RayOptions, RayRTNStream, fetch_each, ray_session, submit
from qkiln.pipeline.stream import CodeStore, RTNStream
from qkiln.targets.recipe import Artifact, Recipe

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


def code_groups(artifacts: list[Artifact]) -> list[list[Artifact]]:
    """The artifacts that may share codes — same scheme, algorithm and rules, whatever the format — in recipe
    order: one unit of work, since a CodeStore's recording must come before its replays (groups in the
    order of their first artifact)."""
    by: dict[tuple[Any, ...], list[Artifact]] = {}
    for a in artifacts:
        by.setdefault((a.scheme, a.algo, a.uniform, a.rules), []).append(a)
    return list(by.values())


def make_artifact(model: Path, artifact: Artifact, dest: Path, recipe: Recipe,
                  progress: Callable[[str], None] | None = None, store: CodeStore | None = None,
                  rtn: Callable[..., RTNStream] = RTNStream) -> dict[str, Any]:
    """Quantize `model` as `artifact` says and write it at `dest`; returns the converter's summary with, for
    every format, "bits_per_weight", "tensor_types" and "fallbacks" (and "codes_from" when `store` held the
    codes already: the artifact that made them).

    The single call site of the format writers. `rtn` makes the stream of RTN weights (RayRTNStream: Ray tasks)."""
    cal = recipe.calibration
    fmt = artifact.format
    common: dict[str, Any] = dict(algorithm=artifact.algo, calib=list(cal.text) if artifact.algo != "rtn" else [],
                                  samples=cal.samples, seq_len=cal.seq_len, progress=progress, store=store, rtn=rtn)
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


Made = dict[str, tuple[Path, dict[str, Any], float]]  # artifact name -> (where it was made, summary, seconds)


def make_group(model: Path, group: list[Artifact], work: Path, recipe: Recipe, progress: Progress | None = None,
               ray: RayOptions | None = None) -> Made:
    """Make a code group's artifacts (`code_groups`) in recipe order, in a new folder under `work`: the same
    (format, scheme, algorithm) once and then copied, other formats from the first one's codes (a CodeStore in
    that folder). A Ray task's work under --ray (then its RTN tensors are tasks too): each attempt writes a
    folder of its own, so a retried task never meets a killed attempt's files."""
    say = progress or (lambda stage, done, total: None)
    folder = Path(tempfile.mkdtemp(prefix="group-", dir=work))
    shared = len({a.format for a in group}) > 1
    rtn: Callable[..., RTNStream] = functools.partial(RayRTNStream, options=ray) if ray else RTNStream
    first: dict[tuple[Any, ...], tuple[Path, dict[str, Any]]] = {}  # quantization key -> (artifact, summary)
    made: Made = {}
    for a in group:
        dest = folder / f"{a.name}{WRITERS[a.format]}"
        key = quantization_key(a)
        t0 = time.perf_counter()
        if key in first:  # same codes: quantize once, reuse
            source, source_summary = first[key]
            if source.is_dir():
                shutil.copytree(source, dest)
            else:
                shutil.copyfile(source, dest)
            summary = {**source_summary, "reused_from": source.name}
        else:
            say(f"quantize {a.name} ({a.scheme}, {a.algo})", recipe.artifacts.index(a), len(recipe.artifacts))

            def step(what: str, label: str = f"quantize {a.name}") -> None:
                say(f"{label}: {what}", 0, 0)

            store = CodeStore(folder / ".codes", label=a.name) if shared else None
            summary = make_artifact(model, a, dest, recipe, progress=step, store=store, rtn=rtn)
            first[key] = (dest, summary)
        made[a.name] = (dest, summary, round(time.perf_counter() - t0, 3))
    return made


def make_groups(model: Path, groups: list[list[Artifact]], work: Path, recipe: Recipe, say: Progress,
                ray: RayOptions | None) -> Made:
    """Every group made here one after the other, or as one Ray task each (`ray`: a session for the time)."""
    if ray is None:
        return {name: m for g in groups for name, m in make_group(model, g, work, recipe, say).items()}
    with ray_session(ray):
        say(f"quantize on Ray: {len(groups)} task(s)", 0, len(groups))
        refs = [submit(ray, make_group, model, g, work, recipe, None, ray) for g in groups]
        done = fetch_each(refs, lambda k: say(f"quantize on Ray: {k}/{len(groups)} task(s) done", k, len(groups)))
    return {name: m for d in done for name, m in d.items()}
