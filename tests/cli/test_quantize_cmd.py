"""`qkiln quantize` through CliRunner: a simulated checkpoint that eval can load, and exit 2 with no output
for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.formats.hf import Checkpoint

runner = CliRunner()


@pytest.fixture
def tiny_model(make_checkpoint, tiny_config):
    return make_checkpoint(tiny_config(intermediate_size=192))


@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    words = "the model weight layer quantize token scale group block tensor kernel cache memory speed accuracy".split()
    rng = np.random.default_rng(0)
    path.write_text(" ".join(rng.choice(words, size=3000)) + "\n", encoding="utf-8")
    return path


def test_gptq_writes_checkpoint_and_record(tiny_model, calib_text, tmp_path):
    out = tmp_path / "q"
    res = runner.invoke(app, ["quantize", "--model", str(tiny_model), "--scheme", "q4_0", "--algo", "gptq",
                              "--calib", str(calib_text), "--samples", "4", "--seq-len", "64", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["algo"] == "gptq" and record["calibration"]["samples"] == 4
    assert len(record["calibration"]["sha256"]) == 64 and len(record["layer_seconds"]) == 2
    assert record["peak_rss_bytes"] > 0
    on_disk = json.loads((out / "quantization.json").read_text())
    assert on_disk["schemes"]["model.layers.0.mlp.down_proj.weight"] == "q4_0"
    assert (out / "tokenizer.json").is_file()
    ck = Checkpoint.open(out)
    w = ck.tensor("model.layers.1.self_attn.q_proj.weight")
    # the stored weights are on a 4-bit grid: at most 16 distinct values per 32-block (raw floats have 32)
    blocks = np.sort(w.reshape(-1, 32), axis=1)
    distinct = 1 + (np.diff(blocks, axis=1) != 0).sum(axis=1)
    assert distinct.max() <= 16 and w.shape == (64, 64)


def test_rtn_default_demo_not_needed_and_force(tiny_model, tmp_path):
    out = tmp_path / "r"
    args = ["quantize", "--model", str(tiny_model), "--scheme", "int4_g32_asym", "-o", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--scheme", "q4_zz"], "unknown scheme"),
        (["--scheme", "int4_g128"], "not a multiple"),  # hidden 64 is not a multiple of 128
        (["--scheme", "q4_0", "--algo", "gptq", "--seq-len", "100000"], "one sample needs 100000"),
        (["--scheme", "q4_0", "--algo", "awq"], "needs calibration text"),
        (["--scheme", "q4_0", "--preset", "q4_k_m"], "exactly one"),
        (["--preset", "q9_z"], "unknown preset"),
    ],
)
def test_bad_input_exits_2_and_leaves_nothing(tiny_model, calib_text, tmp_path, extra, message):
    out = tmp_path / "bad"
    args = ["quantize", "--model", str(tiny_model), "-o", str(out), *extra]
    if "--seq-len" in extra:
        args += ["--calib", str(calib_text)]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]


def test_fallback_flag_and_preset_record_why(tiny_model, tmp_path):
    out = tmp_path / "k"
    res = runner.invoke(app, ["quantize", "--model", str(tiny_model), "--scheme", "q4_k", "--fallback", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout)
    assert record["schemes"]["model.layers.0.mlp.gate_proj.weight"] == "q5_0"
    assert "not a multiple of q4_k" in record["fallbacks"]["model.layers.0.mlp.gate_proj.weight"]
