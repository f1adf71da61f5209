"""The documented CI pipeline (docs/ci/qkiln-release.yml) is valid YAML that builds a recipe, uploads the artifacts
and the report, and fails on a regression against the last release's manifest."""

from __future__ import annotations

from pathlib import Path

import yaml

WORKFLOW = Path(__file__).resolve().parents[1] / "docs" / "ci" / "qkiln-release.yml"


def test_workflow_builds_uploads_and_gates_on_the_baseline():
    doc = yaml.safe_load(WORKFLOW.read_text())
    steps = doc["jobs"]["build"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    uses = [s.get("uses", "") for s in steps]
    assert "qkiln build qkiln/recipes/" in runs
    assert "--baseline" in runs and "--junit" in runs
    assert any(u.startswith("actions/upload-artifact") for u in uses)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"  # a failing build's report is still uploaded
    targets = doc["jobs"]["build"]["strategy"]["matrix"]["target"]
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert all((recipes / f"{t}.toml").is_file() for t in targets)
