"""`qkiln eval`: perplexity and speed of a model on a text; KL divergence and top-1 agreement against a reference."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.pipeline.load import load_model
from qkiln.validate.evaluate import evaluate
from qkiln.validate.windows import make_windows, read_text


@handles_errors
def eval_command(
    text: Annotated[Path, typer.Option("--text", help="UTF-8 text to score (e.g. a license from /usr/share/common-licenses).")],
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Checkpoint folder or .gguf artifact; default: the bundled demo model.")
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", min=2, help="Window length in tokens.")] = 512,
    max_windows: Annotated[int | None, typer.Option("--max-windows", min=1, help="Score at most this many windows.")] = None,
    ref: Annotated[
        Path | None,
        typer.Option("--ref", help="Reference model (e.g. the unquantized checkpoint): adds mean KL and top-1 agreement."),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")] = False,
) -> None:
    """Perplexity over non-overlapping windows of --ctx tokens (no BOS; each window scores its tokens 1..ctx-1)."""
    body = read_text(text)
    lm = load_model(model)
    windows = make_windows(lm.encode(body), ctx, max_windows=max_windows)
    reference = load_model(ref) if ref is not None else None
    if reference is not None and reference.model.config.vocab_size != lm.model.config.vocab_size:
        from qkiln.errors import UserError

        raise UserError(
            f"--ref {reference.path} has vocabulary {reference.model.config.vocab_size}, the model "
            f"{lm.model.config.vocab_size}; compare models that share a tokenizer"
        )
    with Progress(
        TextColumn("[bold]eval[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        disable=json_out and not console.is_terminal,
    ) as bar:
        task = bar.add_task("windows", total=len(windows))
        result = evaluate(
            lm.logits, windows, reference=reference.logits if reference else None,
            on_window=lambda _: bar.advance(task),
        )
    doc = {"model": str(lm.path), "text": str(text), **result.as_dict()}
    if ref is not None:
        doc["reference"] = str(reference.path) if reference else None
    if json_out:
        print_json(doc)
        return
    console.print(f"model        {lm.path}")
    console.print(f"windows      {result.windows} x {ctx} tokens ({result.scores.n_tokens} scored)")
    console.print(f"perplexity   {result.scores.perplexity:.4f}")
    if result.scores.mean_kl is not None:
        console.print(f"mean KL      {result.scores.mean_kl:.6f} nats (max {result.scores.kl_max:.4f})")
        console.print(f"top-1 agree  {100 * result.scores.top1_agreement:.2f}%")
    console.print(f"speed        {result.tokens_per_second:.1f} tokens/s (prompt processing, this machine)")
    typer.echo(f"perplexity {result.scores.perplexity:.4f}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
