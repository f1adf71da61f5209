"""The CLI maps qkiln's exceptions to exit codes, with one line and no traceback."""

from __future__ import annotations

import subprocess
import sys

import typer
from typer.testing import CliRunner

from qkiln.cli.common import handles_errors
from qkiln.cli.main import app
from qkiln.errors import GateFailed, UserError


def _app_raising(exc: Exception) -> typer.Typer:
    a = typer.Typer()

    @a.command()
    @handles_errors
    def boom() -> None:
        raise exc

    return a


def test_user_error_is_exit_2_one_line():
    r = CliRunner().invoke(_app_raising(UserError("bad thing; do this instead")), [])
    assert r.exit_code == 2
    assert "bad thing; do this instead" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_gate_failure_is_exit_1():
    assert CliRunner().invoke(_app_raising(GateFailed("ppl 12 > 11")), []).exit_code == 1


def test_missing_text_file_is_exit_2_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "qkiln.cli.main", "eval", "--model", str(tmp_path), "--text", str(tmp_path / "none.txt")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_version():
    r = CliRunner().invoke(app, ["version"])
    assert r.exit_code == 0 and r.stdout.strip()


def test_cli_algorithms_are_the_quantizers():
    """--algo offers every quantizer's algorithm, and `auto`, which resolves to one of them."""
    from qkiln.cli.common import Algo
    from qkiln.quantize.algorithms import AUTO, resolve_algorithm
    from qkiln.quantize.calibrate import ALGOS

    assert tuple(a.value for a in Algo) == (*ALGOS, AUTO)
    assert {resolve_algorithm(AUTO, calibrated=c) for c in (True, False)} <= set(ALGOS)
