"""`qkiln info`: the summary of a good checkpoint, and exit 2 with one line for every bad one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

BAD_KINDS = [
    "truncated", "header_too_long", "index_escapes", "missing_tensor", "wrong_shape",
    "unsupported_arch", "pickle_only", "not_a_folder", "no_config",
]


def _info(*args):
    return CliRunner().invoke(app, ["info", *map(str, args)])


def test_info_text(make_checkpoint, tiny_config):
    path = make_checkpoint(tiny_config(), dtype="BF16", shards=2)
    r = _info("--model", path)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "architecture LlamaForCausalLM" in out
    assert "4 heads, 2 KV heads, head_dim 16" in out
    assert "k_proj 32 x 64" in out and "down_proj 64 x 128" in out
    assert "in 2 file(s)" in out and "BF16" in out
    assert "tokenizer    yes (vocab 512)" in out


def test_info_json(make_checkpoint, tiny_config, llama_weights):
    cfg = tiny_config(tie_word_embeddings=True)
    r = _info("-m", make_checkpoint(cfg, dtype="F16", tokenizer=False), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    n = sum(v.size for v in llama_weights(cfg).values())
    assert doc["parameters"] == n and doc["dtype_parameters"] == {"F16": n}
    assert doc["bytes"] == 2 * n
    assert doc["tie_word_embeddings"] is True and doc["shapes"]["lm_head"] == "tied to embed_tokens"
    assert doc["tokenizer"] == {"present": False}
    assert doc["num_key_value_heads"] == 2 and doc["shapes"]["q_proj"] == [64, 64]


def test_info_reports_a_broken_tokenizer_without_failing(make_checkpoint):
    path = make_checkpoint()
    (path / "tokenizer.json").write_text("{}")
    r = _info("-m", path, "--json")
    assert r.exit_code == 0
    tok = json.loads(r.stdout)["tokenizer"]
    assert tok["present"] is True and "cannot be loaded" in tok["error"]


def test_info_lists_ignored_tensors(make_checkpoint):
    import numpy as np

    path = make_checkpoint(extra={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
    r = _info("-m", path)
    assert r.exit_code == 0
    assert "ignored      1 extra tensor(s), e.g. model.layers.0.self_attn.rotary_emb.inv_freq" in r.stdout


@pytest.mark.slow
def test_info_defaults_to_the_demo_model():
    r = _info("--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["hidden_size"] == 576 and doc["num_hidden_layers"] == 30


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_exit_2_one_line(bad_checkpoint, kind):
    r = _info("--model", bad_checkpoint(kind))
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert re.search(bad_checkpoint.message(kind), lines[0]), lines[0]
    assert r.stdout == ""


@pytest.mark.parametrize("kind", ["truncated", "index_escapes", "pickle_only", "unsupported_arch"])
def test_bad_checkpoint_real_process_has_no_traceback(bad_checkpoint, kind, tmp_path):
    # The installed console script, in a narrow terminal: the message must still be one line.
    script = Path(sys.executable).parent / "qkiln"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "qkiln.cli.main"]
    proc = subprocess.run(
        [*exe, "info", "--model", str(bad_checkpoint(kind))],
        capture_output=True, text=True, env={"COLUMNS": "40", "PATH": "/usr/bin:/bin"}, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(bad_checkpoint.message(kind), lines[0]), proc.stderr
    assert proc.stdout == ""
    assert not (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("name", ["a[/x]b", "models[bold]x"])
def test_message_with_brackets_is_printed_verbatim(tmp_path, name):
    r = _info("--model", tmp_path / name)
    assert r.exit_code == 2, r.output
    assert f"{name} does not exist" in r.stderr
