"""`qkiln eval` on a checkpoint folder and on a GGUF artifact (run on its packed blocks)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qkiln.cli.main import app


def _eval(*args):
    return CliRunner().invoke(app, ["eval", *map(str, args)])


def test_gguf_artifact_scores_like_its_imported_checkpoint(tmp_path, make_gguf):
    text = tmp_path / "t.txt"
    text.write_text(open("/usr/share/common-licenses/Apache-2.0").read()[:6000])
    gguf_path = make_gguf()  # GGUF_TINY_TYPES: Q4_0, Q4_K, Q5_0, Q4_1, Q6_K, Q8_0 run packed; F16, BF16 dense
    ckpt = tmp_path / "ckpt"
    r = CliRunner().invoke(app, ["import-gguf", str(gguf_path), "-o", str(ckpt)])
    assert r.exit_code == 0, r.output

    packed = _eval("--model", gguf_path, "--text", text, "--ctx", 64, "--max-windows", 4, "--ref", ckpt, "--json")
    assert packed.exit_code == 0, packed.output
    doc = json.loads(packed.stdout)
    assert doc["windows"] == 4 and doc["scored_tokens"] == 4 * 63
    # same weights; only the int8 activation rounding of the packed kernels differs
    assert doc["mean_kl"] < 1e-2 and doc["top1_agreement"] > 0.9, doc

    dense = json.loads(_eval("--model", ckpt, "--text", text, "--ctx", 64, "--max-windows", 4, "--json").stdout)
    assert abs(doc["perplexity"] - dense["perplexity"]) / dense["perplexity"] < 0.02


def test_bad_inputs_exit_2(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert _eval("--model", tmp_path / "missing", "--text", text).exit_code == 2
    not_model = tmp_path / "x.bin"
    not_model.write_bytes(b"\0" * 16)
    r = _eval("--model", not_model, "--text", text)
    assert r.exit_code == 2 and "neither a checkpoint folder nor a .gguf" in r.output
