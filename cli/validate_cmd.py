"""`qkiln validate ARTIFACT --reference M`: accuracy, target ISA, speed and cost of one artifact; a CI verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.errors import UserError

DEFAULT_TEXT = [Path("/usr/share/common-licenses") / n for n in ("GPL-2", "Apache-2.0", "MPL-2.0")]


def find_recipe(target: str) -> Path:
    """A recipe path, or a target name looked up as recipes/<name>.toml here and beside qkiln's source."""
    p = Path(target)
    if p.suffix == ".toml" or p.exists():
        return p
    import qkiln.targets

    for folder in (Path("recipes"), Path(qkiln.targets.__file__).resolve().parents[1] / "recipes"):
        if (folder / f"{target}.toml").is_file():
            return folder / f"{target}.toml"
    raise UserError(f"--target {target}: no recipes/{target}.toml found; pass a target name or a recipe file")


@handles_errors
def validate_command(
    artifact: Annotated[Path, typer.Argument(help="The artifact to validate: a .gguf file, or an ONNX, "
                                             "compressed-tensors or GPTQ folder.")],
    reference: Annotated[
        Path | None, typer.Option("--reference", "--ref", help="The unquantized checkpoint (default: the demo model).")
    ] = None,
    text: Annotated[list[Path] | None, typer.Option("--text", help="Evaluation text (repeatable; default: the "
                                                   "target's, else GPL-2, Apache-2.0, MPL-2.0 licenses).")] = None,
    target: Annotated[str | None, typer.Option("--target", help="Target name (recipes/<T>.toml) or recipe file: "
                                               "its thresholds, ISA check, bandwidth and price.")] = None,
    ctx: Annotated[int | None, typer.Option("--ctx", min=16, help="Window length in tokens (default: the target's or 512).")] = None,
    max_windows: Annotated[int | None, typer.Option("--max-windows", min=1, help="Windows to score (default: the target's or 4).")] = None,
    max_kl: Annotated[float | None, typer.Option("--max-kl", min=0.0, help="Fail above this mean KL (nats).")] = None,
    max_ppl_increase: Annotated[float | None, typer.Option("--max-ppl-increase", min=0.0, help="Fail above this perplexity increase (%).")] = None,
    min_top1: Annotated[float | None, typer.Option("--min-top1", min=0.0, max=1.0, help="Fail below this top-1 agreement.")] = None,
    min_tokens_per_s: Annotated[float | None, typer.Option("--min-tokens-per-s", min=0.0, help="Fail below this decode speed here.")] = None,
    max_isa_kl: Annotated[float | None, typer.Option("--max-isa-kl", min=0.0, help="Fail above this target-ISA vs host mean KL.")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="An earlier build's manifest.json: fail on a regression against it.")] = None,
    junit: Annotated[Path | None, typer.Option("--junit", help="Write the checks as JUnit XML here.")] = None,
    no_real_runtime: Annotated[bool, typer.Option("--no-real-runtime", help="Skip llama.cpp even when installed.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Score ARTIFACT against the reference (KL, perplexity, top-1) through qkiln's runtime (onnxruntime for an ONNX
    folder) and llama.cpp (GGUF), run a GGUF on the target's instruction set under qemu (Arm targets), measure
    speed here (GGUF, ONNX) and estimate it for the target.
    Exit 0 when every threshold holds, 1 when one fails (naming the metric), 2 on bad input."""
    from qkiln.cli.progress import stage_progress
    from qkiln.pipeline.load import artifact_format, load_model
    from qkiln.validate.artifact import TargetFacts, reference_logits, validate_artifact
    from qkiln.validate.gates import Thresholds, raise_on_failures
    from qkiln.validate.junit import write_junit
    from qkiln.validate.manifest import baseline_artifact, baseline_checks, read_manifest
    from qkiln.validate.windows import make_windows, read_text

    if not artifact.exists():
        raise UserError(f"artifact {artifact} not found; pass a .gguf file or an ONNX, compressed-tensors or GPTQ folder")
    fmt = artifact_format(artifact)
    if fmt is None:
        raise UserError(f"artifact {artifact} is not a quantized artifact qkiln knows: pass a .gguf file, an ONNX "
                        "folder (genai_config.json) or a compressed-tensors / GPTQ folder (config.json with "
                        "quantization_config)")
    thresholds = Thresholds()
    facts = None
    isa_windows, isa_ctx = 1, 32
    texts = text or None
    if target is not None:
        from qkiln.targets.recipe import load_recipe

        rec = load_recipe(find_recipe(target))
        t = rec.target
        facts = TargetFacts(t.name, t.qemu_cpu, t.memory_bandwidth_gbs, t.price_per_hour, t.instance, t.kind)
        match = [a for a in rec.artifacts if a.name == artifact.stem]
        thresholds = rec.thresholds_for(match[0]) if match else rec.thresholds
        texts = texts or list(rec.evaluation.text)
        ctx = ctx or rec.evaluation.ctx
        max_windows = max_windows or rec.evaluation.max_windows
        isa_windows, isa_ctx = rec.evaluation.isa_windows, rec.evaluation.isa_ctx
    try:
        thresholds = thresholds.merged(Thresholds(max_kl, max_ppl_increase, min_top1, min_tokens_per_s, max_isa_kl))
    except ValueError as e:
        raise UserError(str(e)) from None
    base_doc = read_manifest(baseline) if baseline is not None else None
    ref_model = load_model(reference)
    body = "".join(read_text(p) for p in (texts or DEFAULT_TEXT))
    windows = make_windows(ref_model.encode(body), ctx or 512, max_windows=max_windows or 4)
    with stage_progress(quiet=as_json) as report:
        ref, ref_tmp = reference_logits(ref_model.logits, windows, progress=report)
        del ref_model
        try:
            result, checks = validate_artifact(artifact, ref, thresholds, fmt=fmt, target=facts, isa_windows=isa_windows,
                                           isa_ctx=isa_ctx, real_runtime=not no_real_runtime, progress=report)
        finally:
            ref_tmp.cleanup()
    if base_doc is not None:
        old = baseline_artifact(base_doc, artifact.stem) or baseline_artifact(base_doc, artifact.name)
        if old is None:
            raise UserError(f"baseline {baseline} has no artifact named {artifact.stem}; pass the manifest of a build "
                            "that made it")
        checks += baseline_checks(artifact.name, result["accuracy"], old)
        result["checks"] = [c.as_dict() for c in checks]
        result["verdict"] = "pass" if all(c.passed for c in checks) else "fail"
    if junit is not None:
        write_junit(junit, checks, suite=f"qkiln validate {artifact.name}")
    doc = {"artifact": str(artifact), "format": fmt, "reference": str(reference) if reference else "demo model",
           "target": facts.name if facts else None, "windows": len(windows), "ctx": int(windows.shape[1]), **result}
    if as_json:
        print_json(doc)
    else:
        acc = result["accuracy"]
        console.print(f"{artifact.name}: mean KL {acc['mean_kl']:.5f}, perplexity {acc['perplexity']:.3f} "
                      f"({acc['ppl_increase_pct']:+.2f}%), top-1 {acc['top1_agreement']:.3f} over {len(windows)} x {windows.shape[1]} tokens")
        for key, label in (("llama_cpp", "llama.cpp"), ("transformers", "transformers")):
            rt = result.get(key, {})
            if rt.get("ran"):
                console.print(f"  {label}: mean KL {rt['mean_kl']:.5f} (qkiln {rt['qkiln_mean_kl_same_windows']:.5f} on the "
                              f"same {rt['windows']} windows), top-1 {rt['top1_agreement']:.3f}")
            elif key in result and fmt != "onnx":
                console.print(f"  {label}: not run ({rt['reason']})")
        console.print(f"  target ISA: {result['isa_check'].get('reason')}")
        sp = result["speed"]
        if sp.get("measured") is False:
            console.print(f"  speed here: {sp['reason']}")
        else:
            console.print(f"  speed here: decode {sp['decode_tokens_per_s']} tok/s, prompt {sp['prompt_tokens_per_s']} "
                          f"tok/s, {sp['weight_gbs']} GB/s = {sp['bandwidth_share']} of read bandwidth ({sp['kernel_path']})")
        est = result.get("target_estimate")
        if est:
            console.print(f"  {facts.name if facts else ''} ESTIMATE: decode {est['decode_tokens_per_s']} tok/s "
                          f"({est['basis']}), ${est.get('usd_per_million_tokens')} per million tokens")
        for c in checks:
            console.print(f"  {'[green]PASS[/]' if c.passed else '[red]FAIL[/]'} {c.message}", soft_wrap=True)
    raise_on_failures(checks)


def register(app: typer.Typer) -> None:
    app.command("validate")(validate_command)
