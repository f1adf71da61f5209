"""`qkiln build RECIPE [--model M] [-o DIR] [--json] [--ray [--ray-address ADDRESS]]`: every artifact of a target,
validated and reported."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qkiln.cli.common import MAX_MEMORY_HELP, console, handles_errors, print_json, report_memory
from qkiln.errors import UserError


def _check_output(out: Path) -> None:
    """Replace only an earlier build's folder (it has a manifest.json) or an empty one, never other files."""
    if out.exists():
        if not out.is_dir():
            raise UserError(f"output {out} is a file; pass a folder for the build (-o DIR)")
        if any(out.iterdir()) and not (out / "manifest.json").is_file():
            raise UserError(f"output {out} holds files that are not a qkiln build (no manifest.json); "
                            "pass an empty or new folder, or an earlier build's folder to replace it")


@handles_errors
def build_command(
    recipe: Annotated[Path, typer.Argument(help="A recipe, e.g. recipes/graviton4.toml.")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Hugging Face checkpoint folder (default: the demo model).")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Output folder (default: dist/<target>); replaced atomically.")
    ] = None,
    speed_seconds: Annotated[float, typer.Option("--speed-seconds", min=0.0, help="Minimum time per speed measurement.")] = 0.5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest on stdout.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help=MAX_MEMORY_HELP)] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Make the artifacts as Ray tasks (pip install 'qkiln\\[ray]'), their RTN tensors too: on a new "
                      "local Ray instance bound to 127.0.0.1, or on the cluster of --ray-address. Same bytes; "
                      "validation and speed stay here, after the tasks.")] = False,
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", metavar="ADDRESS",
        help="Use a running Ray cluster (HOST:PORT of its head, ray://HOST:PORT, or auto) instead of a local "
             "instance; implies --ray. Every node needs this qkiln and the model, calibration texts and output "
             "folder at the same paths (a shared filesystem).")] = None,
) -> None:
    """Quantize the model into every artifact the recipe names, validate each against its thresholds (accuracy,
    target ISA under qemu, speed), and write the artifacts, manifest.json, report.md, report.html and model cards.
    Exit 1 when a threshold fails (the output is still written), 2 on a bad recipe or input."""
    from qkiln.cli.progress import stage_progress
    from qkiln.pipeline.load import resolve_model_path
    from qkiln.targets.build import build, check_buildable
    from qkiln.targets.recipe import load_recipe
    from qkiln.validate.gates import raise_on_failures

    rec = load_recipe(recipe)
    check_buildable(rec)
    out = output or Path("dist") / rec.target.name
    _check_output(out)
    ray_options = None
    if ray or ray_address is not None:
        from qkiln.pipeline.ray_tasks import RayOptions, check_ray

        ray_options = RayOptions(address=ray_address)
        check_ray(ray_options)  # installed, and the cluster answers: before any work
    model_path = resolve_model_path(model)
    if not model_path.is_dir():
        raise UserError(f"--model {model_path} is not a checkpoint folder; pass a Hugging Face checkpoint folder")
    if max_memory is not None:
        from qkiln.formats.hf import Checkpoint
        from qkiln.pipeline.memory import check_memory, convert_plan, parse_size

        limit = parse_size(max_memory)
        ckpt = Checkpoint.open(model_path)
        cal = rec.calibration
        plans = [convert_plan(ckpt, a.format, a.scheme, a.algo, list(cal.text) if a.algo != "rtn" else [],
                              cal.samples, cal.seq_len, uniform=a.uniform) for a in rec.artifacts]
        report_memory(check_memory(plans, limit, eval_ctx=rec.evaluation.ctx), limit)
        if ray_options is not None:
            console.print("[yellow]note:[/] with --ray the estimate holds for each task (one conversion) and the "
                          "driver; Ray runs as many tasks at once as a node has CPUs", soft_wrap=True)
    out.parent.mkdir(parents=True, exist_ok=True)  # e.g. dist/ for the default dist/<target>
    console.print(f"build [bold]{rec.target.name}[/] from {rec.path}: {len(rec.artifacts)} artifacts of {model_path.name} -> {out}")
    with stage_progress(quiet=as_json) as report:
        manifest, checks = build(rec, model_path, out, progress=report, speed_seconds=speed_seconds, ray=ray_options)
    if as_json:
        print_json(manifest)
    for a in manifest["artifacts"]:
        acc = a["accuracy"]
        console.print(f"  {a['name']:24s} {a['size_bytes'] / 2**20:7.1f} MiB  KL {acc['mean_kl']:.4f}  "
                      f"ppl {acc['ppl_increase_pct']:+.2f}%  top-1 {acc['top1_agreement']:.3f}  {a['verdict'].upper()}")
    console.print(f"wrote {out}/ (report.html, report.md, manifest.json) in {manifest['timings']['total_s']:.0f} s")
    raise_on_failures(checks)


def register(app: typer.Typer) -> None:
    app.command("build")(build_command)
