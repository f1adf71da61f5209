"""`qkiln synth --config llama-3-8b -o DIR [--seed N] [--layers N]`: a random checkpoint of a real model's shape."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

from qkiln.cli.common import console, handles_errors, print_json


@handles_errors
def synth_command(
    config: Annotated[str, typer.Option("--config", "-c", help="Model shape: llama-3-8b, llama-3.2-1b or smollm2-135m.",
                                        show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Checkpoint folder to create (atomically).",
                                         show_default=False)],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Same seed, same bytes.")] = 0,
    layers: Annotated[int | None, typer.Option("--layers", min=1, help="Decoder layers (default: the model's own).")] = None,
    shard_size: Annotated[str, typer.Option("--shard-size", help="Largest safetensors shard, e.g. 2GB, 500MB.")] = "2GB",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Write a Hugging Face checkpoint folder of a real model's shape with random BF16 weights (scaled so that
    activations stay in range through every layer), the real config.json and a tokenizer of its vocabulary size,
    generating one tensor at a time: memory stays at about one tensor, the disk bounds the model."""
    from qkiln.pipeline.memory import parse_size
    from qkiln.pipeline.synth import synth_weight_bytes, write_synth

    shard_bytes = parse_size(shard_size, "--shard-size")
    total = synth_weight_bytes(config, layers=layers)  # also checks --config and --layers before any output
    with Progress(TextColumn("[bold]synth[/] {task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=as_json and not console.is_terminal) as bar:
        task = bar.add_task(config, total=total)

        def progress(tensor: str, nbytes: int) -> None:
            bar.update(task, advance=nbytes, description=tensor)

        result = write_synth(output, config, seed=seed, layers=layers, shard_bytes=shard_bytes, overwrite=force,
                             progress=progress)
    summary = result.summary()
    if as_json:
        print_json(summary)
    else:
        console.print(f"wrote {output}/ ({config}, {summary['layers']} layers, {summary['parameters'] / 1e9:.2f} B "
                      f"parameters, {summary['weight_bytes'] / 2**30:.2f} GiB BF16 in {len(summary['shards'])} "
                      f"shard(s)) in {summary['seconds']:.1f} s", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("synth")(synth_command)
