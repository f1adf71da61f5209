"""`qkiln schemes` lists every registered grid and preset."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.quantize.registry import scheme_names
from qkiln.quantize.rules import preset_names


def test_schemes_json_lists_everything() -> None:
    result = CliRunner().invoke(app, ["schemes", "--json", "--row-length", "576"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    by_name = {s["name"]: s for s in doc["schemes"]}
    assert list(by_name) == scheme_names()
    assert doc["presets"] == preset_names()
    assert by_name["q4_0"]["bits_per_weight"] == 4.5 and by_name["q4_0"]["ggml_type"] == "Q4_0"
    assert by_name["q4_k"]["bits_per_weight"] is None  # 576 is not a multiple of 256
    assert by_name["int4_g64_asym"]["bits_per_weight"] == 4.375
    assert by_name["fp8_e4m3fn_pt"]["bits_per_weight"] == round(8 + 32 / 576, 4)  # one float32 scale


def test_schemes_table() -> None:
    result = CliRunner().invoke(app, ["schemes"])
    assert result.exit_code == 0
