"""`qkiln convert --to compressed-tensors|gptq`, `qkiln inspect DIR`, `qkiln eval --model DIR`: the folder,
its summary, its score, and every bad input as exit 2 with nothing left at the destination (also when killed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _left(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name != "ckpt")


@pytest.mark.parametrize(("target", "scheme"), [("compressed-tensors", "int4_g32"), ("compressed-tensors", "fp8_e4m3fn"),
                                                ("gptq", "int4_g64")])
def test_convert_inspect_eval(make_checkpoint, tmp_path: Path, target: str, scheme: str) -> None:
    ckpt = make_checkpoint()
    out = tmp_path / "out"
    r = run("convert", "--model", ckpt, "--to", target, "--scheme", scheme, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["format"] == target and summary["shards"] == ["model-00001-of-00001.safetensors"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "README.md"} <= names
    card = (out / "README.md").read_text()
    assert scheme in card and "algorithm: `rtn`" in card

    r = run("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == target and doc["n_weights"] > 0
    assert run("inspect", out).exit_code == 0

    text = tmp_path / "t.txt"
    text.write_text(Path("/usr/share/common-licenses/Apache-2.0").read_text()[:4000])
    q = run("eval", "--model", out, "--ref", ckpt, "--text", text, "--ctx", 64, "--max-windows", 3, "--json")
    assert q.exit_code == 0, q.output
    doc = json.loads(q.stdout)
    assert doc["windows"] == 3 and doc["mean_kl"] < 0.05, doc


def test_gptq_marlin_warning_is_printed(make_checkpoint, tmp_path: Path) -> None:
    r = run("convert", "--model", make_checkpoint(), "--to", "gptq", "--scheme", "int4_g32_asym", "-o", tmp_path / "g")
    assert r.exit_code == 0, r.output
    assert "gptq_marlin" in r.output and "asymmetric" in r.output


@pytest.mark.parametrize(("args", "message"), [
    (["--to", "gptq", "--scheme", "fp8_e4m3fn"], "GPTQ layout holds 4- or 8-bit integer"),
    (["--to", "compressed-tensors", "--scheme", "q4_0"], "no compressed-tensors format"),
    (["--to", "compressed-tensors", "--scheme", "fp8_e4m3fnuz"], "no loader takes E4M3FNUZ"),
    (["--to", "gptq", "--scheme", "int4_g128"], "one group size per model"),
    (["--to", "compressed-tensors", "--scheme", "int4_g96"], "unknown scheme"),
    (["--to", "gptq", "--scheme", "int4_g32", "--algo", "gptq"], "needs calibration text"),
    (["--to", "safetensors-fp4", "--scheme", "int4_g32"], "safetensors-fp4"),
])
def test_bad_input_is_exit_2_and_leaves_nothing(make_checkpoint, tmp_path: Path, args: list[str], message: str) -> None:
    ckpt = make_checkpoint()
    r = run("convert", "--model", ckpt, *args, "-o", tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert _left(tmp_path) == []


def test_existing_destination_is_exit_2_and_untouched(make_checkpoint, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    r = run("convert", "--model", make_checkpoint(), "--to", "gptq", "--scheme", "int4_g32", "-o", out)
    assert r.exit_code == 2 and "already exists" in r.output
    assert [p.name for p in out.iterdir()] == ["keep"]


def test_killed_mid_write_leaves_nothing(make_checkpoint, tmp_path: Path) -> None:
    """SIGKILL while shards are being written: no folder at the destination (the temporary sibling remains,
    named `.out.partial-*`, never `out`)."""
    ckpt = make_checkpoint()
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time
        import qkiln.formats.compressed_tensors_write as ct
        from qkiln.pipeline.gpu import convert_to_gpu
        real = ct.pack_tensor
        def slow(name, qt):
            time.sleep(0.2)
            print("packing", name, flush=True)
            return real(name, qt)
        ct.pack_tensor = slow
        convert_to_gpu({str(ckpt)!r}, {str(out)!r}, "compressed-tensors", "int4_g32", shard_bytes=10_000)
    """)
    proc = subprocess.Popen([sys.executable, "-P", "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for _ in range(3):  # a few tensors packed and at least one shard written
            proc.stdout.readline()
        time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(p.name.startswith(".out.partial-") for p in tmp_path.iterdir() if p.name != "ckpt")
