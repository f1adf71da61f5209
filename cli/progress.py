"""One rich progress bar for multi-stage commands (build, validate): each stage replaces the description;
a stage with a total shows done/total, one without (total 0) pulses."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from qkiln.cli.common import console


@contextlib.contextmanager
def stage_progress(*, quiet: bool = False) -> Iterator[Callable[[str, int, int], None]]:
    """Yield `report(stage, done, total)`; the bar is drawn on stderr (hidden with quiet off a terminal)."""
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, disable=quiet and not console.is_terminal,
                  transient=False) as bar:
        task = bar.add_task("starting", total=None)

        def report(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage[:90], completed=done, total=total or None)

        yield report
