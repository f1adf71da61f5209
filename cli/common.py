"""What every command shares: error-to-exit-code mapping, the stderr console, JSON output, --model default."""

from __future__ import annotations

import enum
import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from qkiln.errors import QkilnError
from qkiln.quantize.algorithms import ALGORITHMS

# Progress and logs go to stderr; stdout is kept for `--json` documents.
console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


# How codes are chosen on a grid, for every command that quantizes: the members come from the one list,
# quantize.algorithms.ALGORITHMS (`awq+gptq` is the member `awq_gptq`).
Algo = enum.StrEnum("Algo", {a.replace("+", "_"): a for a in ALGORITHMS})  # type: ignore[misc]


def handles_errors(fn: F) -> F:
    """Map qkiln's exceptions to exit codes with a one-line message and no traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QkilnError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]; no partial output was left behind")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def print_json(doc: Any) -> None:
    """One JSON document on stdout (keys sorted so the output is stable)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
