"""`qkiln schemes`: the weight grids and llama.cpp mixes qkiln can quantize to."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from qkiln.cli.common import console, handles_errors, print_json
from qkiln.quantize.registry import ALIASES, describe, scheme_names
from qkiln.quantize.rules import FALLBACK, preset_names


@handles_errors
def schemes(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document instead of a table.")
    ] = False,
    row_length: Annotated[
        int,
        typer.Option("--row-length", min=1, help="Row length (in_features) for the bits-per-weight column."),
    ] = 4096,
) -> None:
    """List the weight grids (--scheme NAME) and llama.cpp mixes (presets) with their storage cost."""
    rows = [describe(n, row_length) for n in scheme_names()]
    if as_json:
        print_json({"schemes": rows, "aliases": ALIASES, "presets": preset_names(), "fallback": FALLBACK})
        return
    table = Table(title=f"weight grids (bits/weight on {row_length}-wide rows)")
    for col in ("scheme", "grid", "bits", "cols/scale", "bits/weight", "ggml", "fallback"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            str(r["name"]),
            str(r["grid"]),
            str(r["code_bits"]),
            str(r["group_cols"]),
            "does not fit" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.4g}",
            str(r["ggml_type"] or ""),
            FALLBACK.get(str(r["name"]), ""),
        )
    console.print(table)
    console.print("aliases: " + ", ".join(f"{a} = {c}" for a, c in ALIASES.items()))
    console.print("llama.cpp mixes (presets): " + ", ".join(preset_names()))


def register(app: typer.Typer) -> None:
    app.command("schemes")(schemes)
