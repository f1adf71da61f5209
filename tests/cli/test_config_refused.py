"""A config.json key that changes the math and that qkiln does not implement: every command that reads the
checkpoint exits 2 with one line naming the key, and writes nothing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

L3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# config.json changes -> the key the message names
REFUSED: dict[str, tuple[dict, str]] = {
    "rope_linear": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type 'linear'"),
    "rope_dynamic": ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
                     "rope_parameters.rope_type 'dynamic'"),
    "rope_yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                       "original_max_position_embeddings": 64}}, "rope_parameters.rope_type 'yarn'"),
    "rope_longrope": ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                        "original_max_position_embeddings": 64}}, "rope_scaling.rope_type 'longrope'"),
    "attention_bias": ({"attention_bias": True}, "attention_bias"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias"),
    "hidden_act": ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
    "partial_rotary": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    "partial_rotary_in_rope": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **L3,
                                                    "partial_rotary_factor": 0.5}},
                               "rope_parameters.partial_rotary_factor"),
}


def _refused_checkpoint(make_checkpoint, change: dict):
    path = make_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    for k, v in change.items():  # None: the key is absent
        cfg.pop(k, None) if v is None else cfg.__setitem__(k, v)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _one_line_naming(r, key: str) -> None:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]


@pytest.mark.parametrize("case", list(REFUSED))
def test_convert_and_info_refuse_naming_the_key(make_checkpoint, tmp_path, case):
    change, key = REFUSED[case]
    path = _refused_checkpoint(make_checkpoint, change)
    runner = CliRunner()
    out = tmp_path / "out.gguf"
    _one_line_naming(runner.invoke(app, ["convert", "--model", str(path), "--to", "gguf", "--scheme", "f16",
                                         "-o", str(out)]), key)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    _one_line_naming(runner.invoke(app, ["info", "--model", str(path)]), key)


def test_eval_and_quantize_refuse_too(make_checkpoint, tmp_path):
    path = _refused_checkpoint(make_checkpoint, {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                  "original_max_position_embeddings": 64}})
    text = tmp_path / "t.txt"
    text.write_text("The model weight is 42. " * 40)
    runner = CliRunner()
    _one_line_naming(runner.invoke(app, ["eval", "--model", str(path), "--text", str(text), "--ctx", "16"]),
                     "rope_scaling.type 'yarn'")
    sim = tmp_path / "sim"
    _one_line_naming(runner.invoke(app, ["quantize", "--model", str(path), "--scheme", "int4_g64_asym",
                                         "--algo", "rtn", "-o", str(sim)]), "rope_scaling.type 'yarn'")
    assert not sim.exists()


def test_info_prints_what_transformers_5_wrote(make_checkpoint):
    path = _refused_checkpoint(make_checkpoint, {"rope_theta": None, "rope_scaling": None, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 100000.0, **L3}})
    r = CliRunner().invoke(app, ["info", "--model", str(path)])
    assert r.exit_code == 0, r.output
    assert "llama3 rope (theta 100000, factor 8, low_freq_factor 1, high_freq_factor 4, " \
           "original_max_position_embeddings 64)" in r.stdout
