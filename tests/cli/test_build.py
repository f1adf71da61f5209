"""`qkiln build` on a tiny random model: artifacts, manifest, reports, model cards; gates, determinism and
an interrupted build that leaves the previous output as it was."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.validate.manifest import stable_view

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "targets"))
from recipe_helpers import tiny_recipe

FAST = ["--speed-seconds", "0.01"]


def run_build(recipe: Path, model: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["build", str(recipe), "--model", str(model), "-o", str(out), *FAST, *extra])


@pytest.fixture
def tiny_model(make_checkpoint):
    return make_checkpoint()


def test_build_writes_every_artifact_validated_with_manifest_reports_and_cards(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "dist"
    r = run_build(recipe, tiny_model, out, "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(r.stdout) == manifest
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "report.md", "report.html", "q8_0.gguf", "q8_0.md", "q4_0.gguf", "q4_0.md"])
    assert manifest["verdict"] == "pass"
    assert manifest["recipe"]["file"] == "tiny.toml" and len(manifest["recipe"]["sha256"]) == 64
    assert set(manifest["model"]["files"]) >= {"config.json", "model.safetensors"}
    assert manifest["calibration"]["used"] is False and len(manifest["calibration"]["sha256"]) == 64
    for a in manifest["artifacts"]:
        assert a["verdict"] == "pass"
        assert len(a["sha256"]) == 64 and a["size_bytes"] == (out / a["file"]).stat().st_size
        assert 0 < a["bits_per_weight"] < 32
        assert {"mean_kl", "perplexity", "ppl_increase_pct", "top1_agreement"} <= set(a["accuracy"])
        assert {c["threshold"] for c in a["checks"]} == {"max_mean_kl", "max_ppl_increase_pct", "min_top1"}
        assert a["speed"]["decode_tokens_per_s"] > 0
        assert a["target_estimate"]["estimate"] is True and "usd_per_million_tokens" in a["target_estimate"]
        assert a["isa_check"]["ran"] is False  # an x86 target: no qemu step
    q8, q4 = manifest["artifacts"]
    assert q8["accuracy"]["mean_kl"] < q4["accuracy"]["mean_kl"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<script" not in html and "http" not in html.split("<body>")[1]
    assert "q4_0" in (out / "report.md").read_text()
    assert "sha256" in (out / "q4_0.md").read_text()


def test_same_codes_are_quantized_once(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path, artifacts='''
[[artifacts]]
name = "a"
format = "gguf"
scheme = "q8_0"

[[artifacts]]
name = "b"
format = "gguf"
scheme = "q8_0"
''')
    out = tmp_path / "dist"
    r = run_build(recipe, tiny_model, out)
    assert r.exit_code == 0, r.output
    a, b = json.loads((out / "manifest.json").read_text())["artifacts"]
    assert b["reused_from"] == "a.gguf" and a["sha256"] == b["sha256"]


def test_impossible_threshold_exits_1_naming_the_metric_and_still_writes_the_report(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path)
    text = recipe.read_text().replace("min_top1 = 0.0", "min_top1 = 1.0").replace("max_mean_kl = 5.0", "max_mean_kl = 0.0")
    recipe.write_text(text)
    out = tmp_path / "dist"
    r = run_build(recipe, tiny_model, out)
    assert r.exit_code == 1, r.output
    assert "mean_kl" in r.output and "fails max_mean_kl" in r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verdict"] == "fail"
    assert "FAIL" in (out / "report.md").read_text()


def test_two_builds_give_the_same_bytes_and_manifest(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path, artifacts='''
[[artifacts]]
name = "q4_0-gptq"
format = "gguf"
scheme = "q4_0"
algo = "gptq"
uniform = true
''')
    docs = []
    for name in ("one", "two"):
        r = run_build(recipe, tiny_model, tmp_path / name)
        assert r.exit_code == 0, r.output
        docs.append(json.loads((tmp_path / name / "manifest.json").read_text()))
    assert (tmp_path / "one" / "q4_0-gptq.gguf").read_bytes() == (tmp_path / "two" / "q4_0-gptq.gguf").read_bytes()
    assert docs[0]["calibration"]["used"] is True
    assert stable_view(docs[0]) == stable_view(docs[1])
    assert docs[0]["timings"] != {} and "speed" in docs[0]["artifacts"][0]  # the parts that may differ exist


def test_build_refuses_to_replace_a_folder_that_is_not_a_build(tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = run_build(tiny_recipe(tmp_path), tiny_model, out)
    assert r.exit_code == 2 and "not a qkiln build" in r.output
    assert (out / "precious.txt").read_text() == "keep me"


def test_kill_9_during_a_build_leaves_the_previous_output_intact(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path)
    out = tmp_path / "dist"
    assert run_build(recipe, tiny_model, out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    qkiln = Path(sys.executable).with_name("qkiln")
    proc = subprocess.Popen([str(qkiln), "build", str(recipe), "--model", str(tiny_model), "-o", str(out), *FAST],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # kill once the new build is writing its artifacts
        partial = [p for p in tmp_path.glob(".dist.partial-*") if any(p.glob("*.gguf"))]
        if partial:
            break
        time.sleep(0.02)
    else:
        proc.kill()
        pytest.fail("the build never started writing")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert list(tmp_path.glob(".dist.partial-*")), "SIGKILL leaves the killed build's temporary folder"
    # the next build of the same output removes the killed one's temporary folder
    assert run_build(recipe, tiny_model, out).exit_code == 0
    assert list(tmp_path.glob(".dist.*")) == []


FOLDER_ARTIFACTS = '''
[[artifacts]]
name = "q8_0"
format = "gguf"
scheme = "q8_0"

[[artifacts]]
name = "int4-onnx"
format = "onnx"
scheme = "int4_g32"
algo = "gptq"

[[artifacts]]
name = "fp8-ct"
format = "compressed-tensors"
scheme = "fp8_e4m3fn"

[[artifacts]]
name = "w4-gptq"
format = "gptq"
scheme = "int4_g32"
'''


def test_onnx_and_gpu_folders_build_validate_and_are_byte_deterministic(tiny_model, tmp_path):
    recipe = tiny_recipe(tmp_path, artifacts=FOLDER_ARTIFACTS)
    docs = []
    for name in ("one", "two"):
        r = run_build(recipe, tiny_model, tmp_path / name)
        assert r.exit_code == 0, r.output
        docs.append(json.loads((tmp_path / name / "manifest.json").read_text()))
    one, two = tmp_path / "one", tmp_path / "two"
    assert stable_view(docs[0]) == stable_view(docs[1])
    by = {a["name"]: a for a in docs[0]["artifacts"]}
    assert (one / "genai_config.json").exists() is False and (one / "int4-onnx" / "genai_config.json").is_file()
    for name in ("int4-onnx", "fp8-ct", "w4-gptq"):
        a = by[name]
        folder = one / a["file"]
        assert a["file"] == name and folder.is_dir()
        files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        assert sorted(a["files"]) == files and files
        for f in files:  # byte-identical across the two builds
            assert (folder / f).read_bytes() == (two / name / f).read_bytes(), f
        assert a["size_bytes"] == sum((folder / f).stat().st_size for f in files)
        assert len(a["sha256"]) == 64 and 0 < a["bits_per_weight"] < 32
        assert a["verdict"] == "pass"
        assert {c["threshold"] for c in a["checks"]} == {"max_mean_kl", "max_ppl_increase_pct", "min_top1"}
        assert a["llama_cpp"]["ran"] is False and "not applicable" in a["llama_cpp"]["reason"]
        assert a["isa_check"]["ran"] is False and "not applicable" in a["isa_check"]["reason"]
        if name == "int4-onnx":  # a CPU runtime: timed whole through onnxruntime, estimated for the target
            sp = a["speed"]
            assert sp["kernel_path"].startswith("onnxruntime") and sp["decode_tokens_per_s"] > 0
            assert sp["prompt_tokens_per_s"] > 0 and 0 < sp["bandwidth_share"] and sp["weight_bytes"] > 0
            assert a["target_estimate"]["estimate"] is True and a["target_estimate"]["decode_tokens_per_s"] > 0
        else:  # a GPU format: this CPU's speed says nothing of the GPU
            assert a["speed"]["measured"] is False and "not measured here" in a["speed"]["reason"]
            assert "target_estimate" not in a
        assert (one / f"{name}.md").is_file()
    assert by["fp8-ct"]["tensor_types"] and by["int4-onnx"]["tensor_types"]
    # a float8 grid is closer than 4 bits; the q8_0 GGUF beside them is untouched by the folder formats
    assert by["fp8-ct"]["accuracy"]["mean_kl"] < by["w4-gptq"]["accuracy"]["mean_kl"]
    assert by["q8_0"]["speed"]["decode_tokens_per_s"] > 0 and by["q8_0"]["file"] == "q8_0.gguf"
    report = (one / "report.md").read_text()
    assert "n/a (GGUF only)" in report and "not measured here" in report


SAME_GRID_TWO_FORMATS = '''
[[artifacts]]
name = "w4-ct"
format = "compressed-tensors"
scheme = "int4_g32"
algo = "gptq"

[[artifacts]]
name = "w4-gptq"
format = "gptq"
scheme = "int4_g32"
algo = "gptq"
'''

ONLY_GPTQ = SAME_GRID_TWO_FORMATS.split("[[artifacts]]")[2].join(["[[artifacts]]", ""])


def test_two_formats_on_one_grid_quantize_once_and_match_a_build_of_either_alone(tiny_model, tmp_path):
    """compressed-tensors and the GPTQ layout of the same grid and algorithm: the second is written from the
    first's recorded codes (`codes_from`), and its bytes equal a build that made it alone."""
    both = tmp_path / "both"
    r = run_build(tiny_recipe(tmp_path / "r1", artifacts=SAME_GRID_TWO_FORMATS), tiny_model, both)
    assert r.exit_code == 0, r.output
    by = {a["name"]: a for a in json.loads((both / "manifest.json").read_text())["artifacts"]}
    assert "codes_from" not in by["w4-ct"] and by["w4-gptq"]["codes_from"] == "w4-ct"
    assert not (both / ".work").exists()
    alone = tmp_path / "alone"
    r = run_build(tiny_recipe(tmp_path / "r2", artifacts=ONLY_GPTQ), tiny_model, alone)
    assert r.exit_code == 0, r.output
    files = sorted(p.relative_to(alone / "w4-gptq") for p in (alone / "w4-gptq").rglob("*") if p.is_file())
    assert files
    for f in files:
        assert (both / "w4-gptq" / f).read_bytes() == (alone / "w4-gptq" / f).read_bytes(), f
