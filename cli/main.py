"""The `qkiln` command. Each sub-command lives in its own module and registers itself on `app`."""

from __future__ import annotations

import importlib

import typer

from qkiln.cli.common import route_library_logs

app = typer.Typer(
    name="qkiln",
    help="Quantize a Hugging Face Llama checkpoint into validated artifacts per hardware target.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Quantize a Hugging Face Llama checkpoint into validated artifacts per hardware target."""
    route_library_logs()


# One module per command; each defines `register(app)`.
COMMAND_MODULES = [
    "qkiln.cli.import_gguf_cmd",
    "qkiln.cli.version_cmd",
    "qkiln.cli.bench_cmd",
    "qkiln.cli.eval_cmd",
    "qkiln.cli.quantize_cmd",
    "qkiln.cli.info_cmd",
    "qkiln.cli.convert_cmd",
    "qkiln.cli.inspect_cmd",
    "qkiln.cli.schemes_cmd",
    "qkiln.cli.build_cmd",
    "qkiln.cli.validate_cmd",
    "qkiln.cli.synth_cmd",
]

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
