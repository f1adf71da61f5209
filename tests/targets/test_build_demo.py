"""The README's main command on the demo model: `qkiln build recipes/graviton4.toml` passes every threshold,
with the Graviton4 ISA check run under qemu (slow: a few minutes; bench/recipes_bench.py builds every recipe)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.validate.isa_check import missing_tools

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.slow
@pytest.mark.qemu
def test_graviton4_builds_on_the_demo_model_and_every_artifact_passes(tmp_path):
    out = tmp_path / "graviton4"
    r = CliRunner().invoke(app, ["build", str(RECIPES / "graviton4.toml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["verdict"] == "pass"
    assert [a["name"] for a in m["artifacts"]] == ["q4_0-awq-gptq", "q8_0"]
    for a in m["artifacts"]:
        assert a["verdict"] == "pass", a["checks"]
        if missing_tools() is None:
            assert a["isa_check"]["ran"] and a["isa_check"]["kernel_path"] == "i8mm"
    q4, q8 = m["artifacts"]
    assert q8["accuracy"]["mean_kl"] < q4["accuracy"]["mean_kl"] < 0.2
