"""What every command shares: error-to-exit-code mapping, the stderr console, JSON output, --model default."""

from __future__ import annotations

import enum
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from qkiln.errors import QkilnError
from qkiln.quantize.algorithms import ALGORITHMS, AUTO, resolve_algorithm

# Progress and logs go to stderr; stdout is kept for `--json` documents.
console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


# How codes are chosen on a grid, for every command that quantizes: the members come from the one list,
# quantize.algorithms.ALGORITHMS (`awq+gptq` is the member `awq_gptq`), plus `auto` (quantize.algorithms.AUTO:
# awq+gptq with --calib, rtn without), the commands' default.
Algo = enum.StrEnum("Algo", {a.replace("+", "_"): a for a in (*ALGORITHMS, AUTO)})  # type: ignore[misc]
ALGO_HELP = "How codes are chosen on the grid; auto: awq+gptq when --calib is given, else rtn."


def chosen_algorithm(algo: Any, calib: Any, *, quantizes: bool = True) -> str:
    """The algorithm a command runs for its --algo and --calib (auto resolved, said on stderr), with a note
    when calibration text is given to an algorithm that reads none."""
    name = resolve_algorithm(algo.value, calibrated=bool(calib) and quantizes)
    if algo.value == AUTO and quantizes:
        console.print(f"algorithm: {name} (auto: {'calibration text given' if calib else 'no --calib'})")
    elif calib and name == "rtn":
        why = "--algo rtn uses no calibration" if quantizes else "this output is not quantized"
        console.print(f"[yellow]note:[/] {why}; --calib ignored")
    return name


MAX_MEMORY_HELP = ("Refuse (exit 2, nothing written) when the plan's estimated peak memory exceeds this size, "
                   "e.g. 3GB, 2.5GiB, 800MB; the message gives the estimate and what would fit.")


def report_memory(estimate: Any, limit: int) -> None:
    """One stderr line: the plan's estimated peak against --max-memory (it fits, or check_memory raised)."""
    from qkiln.pipeline.memory import fmt_bytes

    console.print(f"memory: estimated peak {fmt_bytes(estimate.total)} within --max-memory {fmt_bytes(limit)} "
                  f"({estimate.biggest()})", soft_wrap=True)


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


class ConsoleLogHandler(logging.Handler):
    """qkiln's library warnings (e.g. a calibration text shorter than asked) as one `note:` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        console.print(f"[yellow]note:[/] {escape(record.getMessage())}", soft_wrap=True)


def route_library_logs() -> None:
    """Send the `qkiln` loggers' warnings through the console, once per process."""
    root = logging.getLogger("qkiln")
    if not any(isinstance(h, ConsoleLogHandler) for h in root.handlers):
        handler = ConsoleLogHandler(logging.WARNING)
        root.addHandler(handler)
        root.setLevel(logging.WARNING)


def print_fallbacks(reasons: dict[str, str], *, verbose: bool) -> None:
    """The per-tensor fallbacks (tensor -> why), one line per rule with a count; every tensor with verbose."""
    from qkiln.quantize.rules import summarize_fallbacks

    lines = [f"{name}: {why}" for name, why in reasons.items()] if verbose else summarize_fallbacks(reasons.values())
    for line in lines:
        console.print(f"[yellow]fallback[/] {escape(line)}", soft_wrap=True)


def print_json(doc: Any) -> None:
    """One JSON document on stdout (keys sorted so the output is stable)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()
