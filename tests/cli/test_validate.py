"""`qkiln validate` as a CI gate: thresholds, JUnit XML, a baseline manifest; exit codes 0 / 1 / 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))
from recipe_helpers import tiny_recipe, write_texts


@pytest.fixture
def built(make_checkpoint, tmp_path):
    """(checkpoint, build folder, recipe) of the tiny model's q8_0 + q4_0 build."""
    model = make_checkpoint()
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "dist"
    r = CliRunner().invoke(app, ["build", str(recipe), "--model", str(model), "-o", str(out), "--speed-seconds", "0.01"])
    assert r.exit_code == 0, r.output
    return model, out, recipe


def validate(model: Path, artifact: Path, *extra: str):
    _, ev = write_texts(artifact.parent.parent / "texts")
    return CliRunner().invoke(app, ["validate", str(artifact), "--reference", str(model), "--text", str(ev),
                                    "--ctx", "32", "--max-windows", "3", *extra])


def test_validate_passes_and_reports_accuracy_speed_and_cost(built):
    model, out, recipe = built
    r = validate(model, out / "q4_0.gguf", "--target", str(recipe), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "pass" and doc["target"] == "tiny"
    assert doc["accuracy"]["mean_kl"] > 0
    assert doc["speed"]["decode_tokens_per_s"] > 0 and doc["speed"]["bandwidth_share"] > 0
    assert doc["target_estimate"]["estimate"] is True and doc["target_estimate"]["usd_per_million_tokens"] > 0
    assert doc["llama_cpp"]["ran"] in (True, False)


def test_impossible_threshold_exits_1_naming_the_metric(built):
    model, out, _ = built
    r = validate(model, out / "q4_0.gguf", "--max-kl", "0")
    assert r.exit_code == 1, r.output
    assert "validation failed" in r.output and "mean_kl" in r.output and "max_mean_kl" in r.output


def test_junit_lists_each_check(built, tmp_path):
    model, out, _ = built
    junit = tmp_path / "checks.xml"
    r = validate(model, out / "q4_0.gguf", "--max-kl", "0", "--min-top1", "0", "--max-ppl-increase", "1000",
                 "--junit", str(junit))
    assert r.exit_code == 1
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"max_mean_kl", "max_ppl_increase_pct", "min_top1"}
    assert cases["max_mean_kl"].find("failure") is not None
    assert cases["min_top1"].find("failure") is None
    assert suite.get("tests") == "3" and suite.get("failures") == "1"


def test_baseline_better_than_the_artifact_fails_and_an_equal_one_passes(built, tmp_path):
    model, out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    assert validate(model, out / "q4_0.gguf", "--baseline", str(out / "manifest.json")).exit_code == 0
    for a in manifest["artifacts"]:
        a["accuracy"]["mean_kl"] *= 0.5  # an earlier release that was twice as good
    better = tmp_path / "release.json"
    better.write_text(json.dumps(manifest))
    junit = tmp_path / "b.xml"
    r = validate(model, out / "q4_0.gguf", "--baseline", str(better), "--junit", str(junit))
    assert r.exit_code == 1, r.output
    assert "regresses against baseline" in r.output and "mean_kl" in r.output
    names = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")]
    assert "baseline:mean_kl" in names


@pytest.mark.parametrize("problem", ["missing_artifact", "bad_baseline", "not_gguf", "bad_target"])
def test_bad_input_exits_2(built, tmp_path, problem):
    model, out, _ = built
    artifact, extra = out / "q4_0.gguf", []
    if problem == "missing_artifact":
        artifact = out / "nope.gguf"
    elif problem == "bad_baseline":
        (tmp_path / "bad.json").write_text("{not json")
        extra = ["--baseline", str(tmp_path / "bad.json")]
    elif problem == "not_gguf":
        artifact = out / "report.md"
    else:
        extra = ["--target", "no-such-target"]
    r = validate(model, artifact, *extra)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize("to,scheme", [("onnx", "int4_g32"), ("compressed-tensors", "int4_g32"), ("gptq", "int4_g32")])
def test_validate_takes_the_folder_formats(built, tmp_path, to, scheme):
    """ONNX, compressed-tensors and GPTQ folders validate like a GGUF: accuracy, thresholds, exit codes. ONNX is
    timed through onnxruntime (a CPU runtime); the GPU formats' speed is reported as not measured here."""
    model, _, recipe = built
    folder = tmp_path / "dist" / f"art-{to}"
    r = CliRunner().invoke(app, ["convert", "--model", str(model), "--to", to, "--scheme", scheme, "-o", str(folder)])
    assert r.exit_code == 0, r.output
    r = validate(model, folder, "--target", str(recipe), "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["format"] == to and doc["verdict"] == "pass" and doc["accuracy"]["mean_kl"] > 0
    assert doc["llama_cpp"]["ran"] is False and doc["isa_check"]["ran"] is False
    if to == "onnx":
        assert doc["speed"]["decode_tokens_per_s"] > 0 and doc["speed"]["kernel_path"].startswith("onnxruntime")
        assert doc["target_estimate"]["usd_per_million_tokens"] > 0
    else:
        assert doc["speed"]["measured"] is False and "target_estimate" not in doc
    if to == "compressed-tensors":  # cross-checked through transformers + compressed-tensors (test environment)
        tf = doc["transformers"]
        assert tf["ran"] is True and tf["windows"] == 3
        assert tf["mean_kl"] == pytest.approx(tf["qkiln_mean_kl_same_windows"], rel=1e-3, abs=1e-6)
    elif to == "gptq":  # GPTQModel does not install beside torch 2.13: said, not hidden
        assert doc["transformers"]["ran"] is False and "GPTQModel" in doc["transformers"]["reason"]
    else:
        assert "transformers" not in doc
    r = validate(model, folder, "--max-kl", "0")
    assert r.exit_code == 1 and "max_mean_kl" in r.output


def test_a_plain_checkpoint_folder_is_not_an_artifact(built):
    model, _, _ = built
    r = validate(model, model)
    assert r.exit_code == 2 and "not a quantized artifact" in r.output and "Traceback" not in r.output
