"""`qkiln bench [ARTIFACT]`: prompt and decode speed of an artifact's real layer shapes on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.errors import UserError


@handles_errors
def bench(
    artifact: Annotated[Path | None, typer.Argument(help="A GGUF file (default: the demo model's GGUF).")] = None,
    threads: Annotated[int | None, typer.Option(help="Threads (default: one per core).", min=1)] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Rows of the prompt product.", min=1)] = 128,
    seconds: Annotated[float, typer.Option(help="Minimum time per measurement.", min=0.0)] = 2.0,
    price_per_hour: Annotated[float | None, typer.Option(help="Instance price, USD/hour, for cost per token.")] = None,
    e2e: Annotated[bool, typer.Option(help="Also run a --prompt-tokens prompt and decode through qkiln's full "
                                           "runtime (attention included).")] = False,
    kernel: Annotated[str | None, typer.Option(help="Force a kernel path (as QKILN_KERNEL).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
) -> None:
    """Time every weight product of ARTIFACT (decode = 1 row, prompt = --prompt-tokens rows) with qkiln's kernels,
    next to this machine's memory copy bandwidth measured in the same run; report the kernel path."""
    from qkiln.kernels import api
    from qkiln.kernels.speed import bench_linears, gguf_linears

    if artifact is None:
        from qkiln.demo import demo_gguf_path

        artifact = demo_gguf_path()
    if not artifact.exists():
        raise UserError(f"artifact {artifact} not found; pass a GGUF file")
    if artifact.is_dir() or artifact.suffix.lower() != ".gguf":
        raise UserError(f"{artifact}: qkiln bench times GGUF files; pass a .gguf artifact")
    if kernel:
        api.set_kernel_path(kernel)
    console.print(f"bench {artifact.name}: kernel path [bold]{api.kernel_path()}[/]")
    doc = {"artifact": str(artifact), **bench_linears(gguf_linears(artifact), threads=threads,
                                                      prompt_tokens=prompt_tokens, seconds=seconds,
                                                      price_per_hour=price_per_hour)}
    if e2e:
        from qkiln.validate.decode_compare import qkiln_decode

        run = qkiln_decode(artifact, tokens=32, threads=threads, prompt_tokens=prompt_tokens, prompt_reps=3)
        doc["e2e_decode_tokens_per_s"] = round(run["decode_tps"], 2)
        doc["e2e_prompt_tokens"] = run["prompt_tokens"]
        doc["e2e_prompt_tokens_per_s"] = round(run["prompt_tps"], 2)
    if json_out:
        print_json(doc)
        return
    for key in ("kernel_path", "threads", "types", "decode_tokens_per_s", "prompt_tokens_per_s",
                "weight_gbs", "machine_copy_gbs", "machine_read_gbs", "weight_gbs_over_copy",
                "usd_per_million_decode_tokens", "usd_per_million_prompt_tokens", "e2e_prompt_tokens_per_s",
                "e2e_decode_tokens_per_s"):
        if key in doc:
            console.print(f"  {key:32s} {doc[key]}")
    console.print(f"  ({doc['note']})")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
