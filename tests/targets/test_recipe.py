"""Recipes load strictly: every shipped recipe loads; each kind of mistake is an error naming file, key, line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.targets.build import check_buildable
from qkiln.targets.recipe import RecipeError, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from recipe_helpers import tiny_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = sorted(p.stem for p in RECIPES.glob("*.toml"))


def test_every_target_of_the_issue_has_a_recipe():
    assert {"graviton2", "graviton3", "graviton4", "mobile-arm64", "x86-avx512", "nvidia-h100", "amd-mi300"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_loads(name):
    r = load_recipe(RECIPES / f"{name}.toml")
    assert r.target.name == name
    assert r.artifacts
    assert {p.resolve() for p in r.calibration.text}.isdisjoint(p.resolve() for p in r.evaluation.text)
    if r.target.arch == "aarch64":
        assert r.target.qemu_cpu, "an Arm target names its qemu CPU model for the ISA check"


def _edit(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path


def _line(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


BAD = {
    # kind: (old text, new text, regex of the message after "<file>: ", the line's marker)
    "unknown_top_key": ("schema = 1", "schema = 1\nsead = 3", r"key sead, line \d+: unknown key", "sead = 3"),
    "unknown_artifact_key": ('scheme = "q8_0"', 'scheme = "q8_0"\nschem = "q4_0"',
                             r"key artifacts\[0\]\.schem, line \d+: unknown key", 'schem = "q4_0"'),
    "wrong_type": ("ctx = 32", 'ctx = "32"', r"key evaluation\.ctx, line \d+: expected an integer, got a string '32'",
                   'ctx = "32"'),
    "unknown_cpu_feature": ('isa = ["avx2"]', 'isa = ["avx2", "avx1024"]',
                            r"key target\.isa, line \d+: unknown CPU feature 'avx1024' for x86_64", "avx1024"),
    "threshold_out_of_range": ("min_top1 = 0.0", "min_top1 = 1.5",
                               r"key thresholds\.min_top1, line \d+: 1\.5 is out of range \(0\.0 to 1\.0\)", "min_top1 = 1.5"),
    "missing_file": ('text = ["', 'text = ["/nonexistent/calib.txt", "',
                     r"key calibration\.text, line \d+: text file /nonexistent/calib\.txt not found", "/nonexistent/"),
    "unknown_format": ('format = "gguf"', 'format = "tflite"',
                       r"key artifacts\[0\]\.format, line \d+: 'tflite' is not one of gguf, onnx, compressed-tensors, gptq",
                       '"tflite"'),
    "unknown_scheme": ('scheme = "q8_0"', 'scheme = "q3_z"', r"key artifacts\[0\]\.scheme, line \d+: unknown scheme 'q3_z'",
                       '"q3_z"'),
    "artifact_threshold_out_of_range": (
        'scheme = "q8_0"', 'scheme = "q8_0"\n[artifacts.thresholds]\nmax_mean_kl = -1.0',
        r"key artifacts\[0\]\.thresholds\.max_mean_kl, line \d+: -1\.0 is out of range", "max_mean_kl = -1.0"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_recipe_names_file_key_and_line(kind, tmp_path):
    old, new, message, marker = BAD[kind]
    path = _edit(tiny_recipe(tmp_path), old, new)
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    text = str(e.value)
    assert text.startswith(f"{path}: "), text
    assert re.search(message, text), text
    assert f"line {_line(path, marker)}:" in text, text


def test_bad_recipe_exits_2_through_the_cli(tmp_path):
    path = _edit(tiny_recipe(tmp_path), 'isa = ["avx2"]', 'isa = ["avx2", "avx1024"]')
    r = CliRunner().invoke(app, ["build", str(path), "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert "unknown CPU feature 'avx1024'" in r.output and str(path) in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "out").exists()


def test_missing_recipe_and_toml_syntax(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe .*nope\.toml not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("schema = 1\n[target\n")
    with pytest.raises(RecipeError, match=r"bad\.toml: not valid TOML: .*line 2"):
        load_recipe(bad)


def test_calibration_and_evaluation_texts_must_be_disjoint(tmp_path):
    path = tiny_recipe(tmp_path)
    text = path.read_text()
    calib = re.search(r'\[calibration\]\ntext = \["([^"]+)"\]', text).group(1)
    path.write_text(re.sub(r'(\[evaluation\]\ntext = \[)"[^"]+"', rf'\1"{calib}"', text))
    with pytest.raises(RecipeError, match="also a calibration text"):
        load_recipe(path)


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_buildable(path):
    """Every format a shipped recipe names has a writer: none is refused as "not available yet"."""
    check_buildable(load_recipe(path))
