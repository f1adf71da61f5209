"""`qkiln import-gguf FILE.gguf -o DIR`: a llama GGUF as an F32 Hugging Face checkpoint folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.formats.gguf_import import import_gguf


@handles_errors
def import_gguf_cmd(
    src: Annotated[Path, typer.Argument(help="The llama GGUF file to import.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint folder to create.", show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace the output folder if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON summary on stdout.")] = False,
) -> None:
    """Import a llama GGUF (any type gguf-py dequantizes) as an F32 Hugging Face checkpoint.

    Tensors are dequantized, llama.cpp's q/k permutation is undone, and config.json plus the tokenizer
    files are rebuilt from the metadata. Nothing is left at OUT if the import fails.
    """
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("dequantizing", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, description=f"dequantizing {name}")

        dest = import_gguf(src, out, overwrite=force, progress=progress)
    seconds = time.perf_counter() - start
    console.print(f"imported {src} -> {dest} in {seconds:.1f} s", soft_wrap=True)
    if as_json:
        from qkiln.model.config import LlamaConfig

        cfg = LlamaConfig.from_file(dest / "config.json")
        print_json({"source": str(src), "output": str(dest), "seconds": round(seconds, 2),
                    "files": sorted(p.name for p in dest.iterdir()), "config": cfg.to_dict()})


def register(app: typer.Typer) -> None:
    app.command("import-gguf")(import_gguf_cmd)
