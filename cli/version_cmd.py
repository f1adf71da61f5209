"""`qkiln version`."""

from __future__ import annotations

import typer

import qkiln


def version() -> None:
    """Print qkiln's version."""
    typer.echo(qkiln.__version__)


def register(app: typer.Typer) -> None:
    app.command("version")(version)
