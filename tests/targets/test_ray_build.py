"""`qkiln build --ray`: the artifacts made as Ray tasks on a local instance bound to 127.0.0.1 are the bytes of the
single-process build; a worker killed mid-task is retried by Ray and the build still gives those bytes (with
retries off the same kill fails the build, cleanly); without Ray or with a bad address: exit 2, nothing written.

Each build starts and stops its own small instance (2 CPUs, no dashboard, a 256 MiB object store)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app
from qkiln.pipeline.ray_tasks import RayOptions, RayTaskLost
from qkiln.targets.build import build
from qkiln.targets.recipe import load_recipe
from qkiln.validate.manifest import stable_view

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recipe_helpers import tiny_recipe

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'qkiln[ray]')")
SMALL = RayOptions(num_cpus=2, object_store_bytes=256 * 2**20)
FAST = ["--speed-seconds", "0.01"]

# Two RTN artifacts in two code groups (two tasks), a llama.cpp mix and a folder format.
DEMO_ARTIFACTS = '''
[[artifacts]]
name = "q4_0"
format = "gguf"
scheme = "q4_0"

[[artifacts]]
name = "int8-ct"
format = "compressed-tensors"
scheme = "int8"
'''
# Three groups: a GGUF; two formats sharing one RTN quantization (a CodeStore inside one task); a calibrated
# ONNX folder (AWQ then GPTQ in a worker, whose bytes follow BLAS's thread count on main since 9d1f5ab).
TINY_ARTIFACTS = '''
[[artifacts]]
name = "q8_0"
format = "gguf"
scheme = "q8_0"

[[artifacts]]
name = "w4-ct"
format = "compressed-tensors"
scheme = "int4_g32"

[[artifacts]]
name = "w4-gptq"
format = "gptq"
scheme = "int4_g32"

[[artifacts]]
name = "int4-onnx"
format = "onnx"
scheme = "int4_g32"
algo = "awq+gptq"
'''


def quick_recipe(folder: Path, artifacts: str) -> Path:
    """tiny_recipe with one evaluation window and no llama.cpp/transformers cross-check: validation is not
    what these tests are about, and it runs on the driver either way."""
    path = tiny_recipe(folder, artifacts=artifacts)
    path.write_text(path.read_text().replace("max_windows = 3", "max_windows = 1\nreal_runtime_windows = 0"))
    return path


def artifact_files(out: Path) -> dict[str, str]:
    """sha256 of every artifact file (GGUF files, every file of the folders); the build's own documents
    (manifest, reports, model cards) carry timings and speeds and are compared through the manifest's stable
    view instead."""
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and not (p.parent == out and p.suffix in (".json", ".md", ".html"))}


def run_cli(recipe: Path, model: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["build", str(recipe), "--model", str(model), "-o", str(out), *FAST, *extra])


def ray_children() -> list[psutil.Process]:
    """Ray's processes started from this test process (gcs_server, raylet, workers, agents)."""
    return [p for p in psutil.Process().children(recursive=True) if _name(p).startswith(("ray::", "gcs_server", "raylet"))]


def _name(p: psutil.Process) -> str:
    try:
        return (p.cmdline() or [p.name()])[0]
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


class WorkerKiller(threading.Thread):
    """Waits for a worker of this test's Ray instance to run `task`, stops it (SIGSTOP: it cannot finish the
    task between the look and the kill), checks it still runs the task, and SIGKILLs it. Also records the
    addresses the instance's processes listen on."""

    def __init__(self, task: str):
        super().__init__(daemon=True)
        self.title = f"ray::{task}"
        self.killed: list[int] = []
        self.listening: set[str] = set()
        self.stop = threading.Event()

    def run(self) -> None:
        looked = 0.0
        while not self.stop.is_set():
            children = ray_children()
            if time.monotonic() - looked > 0.5:
                looked = time.monotonic()
                for p in children:
                    self._record_listening(p)
            for p in children:
                if not self.killed and _name(p).startswith(self.title):
                    try:
                        p.suspend()
                        if _name(p).startswith(self.title):
                            p.kill()
                            self.killed.append(p.pid)
                        else:
                            p.resume()
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.005)

    def _record_listening(self, p: psutil.Process) -> None:
        try:
            self.listening |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


@pytest.fixture
def bigger_tiny_model(make_checkpoint, tiny_config):
    """A tiny model large enough that a group task runs long enough to be caught running (~1 s)."""
    return make_checkpoint(tiny_config(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                                       num_key_value_heads=4))


@pytest.mark.slow
@pytest.mark.ray
@needs_ray
def test_demo_recipe_on_ray_gives_the_bytes_of_the_single_process_build(tmp_path):
    from qkiln.demo import demo_model_dir

    recipe = quick_recipe(tmp_path, DEMO_ARTIFACTS)
    model = demo_model_dir()
    walls = {}
    for name, extra in (("plain", ()), ("ray", ("--ray",))):
        t0 = time.perf_counter()
        r = run_cli(recipe, model, tmp_path / name, *extra)
        walls[name] = round(time.perf_counter() - t0, 1)
        assert r.exit_code == 0, r.output
    plain, on_ray = (json.loads((tmp_path / n / "manifest.json").read_text()) for n in ("plain", "ray"))
    files = artifact_files(tmp_path / "plain")
    assert {"q4_0.gguf", "int8-ct/config.json", "int8-ct/model.safetensors.index.json"} <= set(files)
    assert artifact_files(tmp_path / "ray") == files
    assert stable_view(on_ray) == stable_view(plain)
    assert ray_children() == []  # the local instance was shut down
    print(f"demo recipe wall time: {walls}; quantize s: "
          f"{ {n: {k: v for k, v in m['timings'].items() if k.startswith('quantize')} for n, m in (('plain', plain), ('ray', on_ray))} }")


@pytest.mark.ray
@needs_ray
@pytest.mark.parametrize("retries", [True, False], ids=["retried", "retries-off"])
def test_a_worker_killed_mid_task_is_retried_and_the_build_gives_the_same_bytes(bigger_tiny_model, tmp_path, retries):
    recipe = load_recipe(quick_recipe(tmp_path, TINY_ARTIFACTS))
    killer = WorkerKiller("make_group")
    killer.start()
    out = tmp_path / "ray"
    try:
        if retries:  # Ray's retries as qkiln sets them by default
            on_ray, _ = build(recipe, bigger_tiny_model, out, speed_seconds=0.01, ray=SMALL)
        else:
            with pytest.raises(RayTaskLost, match="WorkerCrashedError"):
                build(recipe, bigger_tiny_model, out, speed_seconds=0.01,
                      ray=dataclasses.replace(SMALL, max_retries=0))
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == 1, "no worker was caught running a group task"
    assert killer.listening and killer.listening <= {"127.0.0.1", "::ffff:127.0.0.1"}, killer.listening
    assert ray_children() == []
    if retries:
        plain, _ = build(recipe, bigger_tiny_model, tmp_path / "plain", speed_seconds=0.01)
        assert artifact_files(out) == artifact_files(tmp_path / "plain")
        assert stable_view(on_ray) == stable_view(plain)
        assert [a.get("codes_from") for a in on_ray["artifacts"]] == [None, None, "w4-ct", None]
    else:  # nothing left where the build was going
        assert not out.exists() and list(tmp_path.glob(".ray.*")) == []


def test_ray_without_ray_installed_exits_2_and_writes_nothing(make_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    recipe = quick_recipe(tmp_path, TINY_ARTIFACTS)
    model = make_checkpoint()
    before = sorted(tmp_path.rglob("*"))
    r = run_cli(recipe, model, tmp_path / "dist", "--ray")
    assert r.exit_code == 2, r.output
    assert "pip install 'qkiln[ray]'" in r.output and "Traceback" not in r.output
    assert sorted(tmp_path.rglob("*")) == before


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address,message", [
    (f"127.0.0.1:{closed_port()}", "no Ray cluster answers"),
    ("nosuchhost.invalid:6379", "no Ray cluster answers"),
    ("not-an-address", "expected HOST:PORT"),
])
def test_a_bad_ray_address_exits_2_at_once_and_writes_nothing(make_checkpoint, tmp_path, address, message):
    recipe = quick_recipe(tmp_path, TINY_ARTIFACTS)
    model = make_checkpoint()
    before = sorted(tmp_path.rglob("*"))
    t0 = time.monotonic()
    r = run_cli(recipe, model, tmp_path / "dist", "--ray-address", address)
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert time.monotonic() - t0 < 30
    assert sorted(tmp_path.rglob("*")) == before


def test_help_names_the_options_and_the_extra():
    r = CliRunner().invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--ray-address" in r.output and "pip install 'qkiln[ray]'" in r.output and "127.0.0.1" in r.output
