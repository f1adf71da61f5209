"""`qkiln convert --to onnx`, `inspect DIR`, `eval --model DIR`: summaries, determinism, and bad input as exit 2
with nothing left at the destination."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

pytest.importorskip("onnxruntime", reason="the ONNX tests need onnxruntime (test extra)")
pytestmark = pytest.mark.onnx
runner = CliRunner()


def convert(*args: str):
    return runner.invoke(app, ["convert", "--to", "onnx", *args])


def test_convert_inspect_eval(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    out = tmp_path / "m"
    r = convert("--model", str(ckpt), "--scheme", "int4_g32", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "qkiln.json"} <= set(summary["files"])
    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["matmulnbits"]["int4 block 32"]["tensors"] == 2 * 5 + 1  # qkv, o, gate, up, down per layer; head
    assert doc["matmulnbits"]["int4 block 32"]["accuracy_level"] == 4
    assert doc["ir_version"] == 10 and doc["qkiln"]["scheme"] == "int4_g32"
    text = tmp_path / "t.txt"
    text.write_text("the model weight layer quantize token scale group block tensor kernel cache " * 20)
    r = runner.invoke(app, ["eval", "--model", str(out), "--ref", str(ckpt), "--text", str(text), "--ctx", "32", "--json"])
    assert r.exit_code == 0, r.output
    ev = json.loads(r.stdout)
    assert ev["mean_kl"] < 0.1 and ev["top1_agreement"] > 0.5  # a random tiny model: flat logits


def test_two_conversions_give_identical_folders(make_checkpoint, tmp_path):
    ckpt = make_checkpoint(tied=True)
    for name in ("a", "b"):
        r = convert("--model", str(ckpt), "--scheme", "int4_g64_asym", "-o", str(tmp_path / name))
        assert r.exit_code == 0, r.output
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_fallback_and_strict(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()  # hidden 64: a 128 block fits only down_proj's 128-wide rows
    r = convert("--model", str(ckpt), "--scheme", "int4_g128", "-o", str(tmp_path / "fb"))
    assert r.exit_code == 0, r.output
    assert "using int4_g64" in r.output
    r = convert("--model", str(ckpt), "--scheme", "int4_g128", "--strict", "-o", str(tmp_path / "strict"))
    assert r.exit_code == 2 and "--strict" in r.output
    assert not (tmp_path / "strict").exists()


@pytest.mark.parametrize("scheme, message", [
    ("q4_k_m", "K-quant mix"),
    ("q4_k", "K-quant"),
    ("fp8_e4m3fn", "no FP8"),
    ("q4_1", "mix; ONNX"),
    ("int3", "unknown scheme"),
])
def test_bad_schemes_exit_2_and_leave_nothing(make_checkpoint, tmp_path, scheme, message):
    ckpt = make_checkpoint()
    out = tmp_path / "out"
    before = set(tmp_path.iterdir())
    r = convert("--model", str(ckpt), "--scheme", scheme, "-o", str(out))
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert set(tmp_path.iterdir()) == before


def test_existing_output_needs_force(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    out = tmp_path / "m"
    out.mkdir()
    r = convert("--model", str(ckpt), "--scheme", "int8", "-o", str(out))
    assert r.exit_code == 2 and "--force" in r.output
    r = convert("--model", str(ckpt), "--scheme", "int8", "-o", str(out), "--force")
    assert r.exit_code == 0, r.output
    assert (out / "model.onnx").is_file()
