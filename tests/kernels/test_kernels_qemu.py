"""Arm kernels under qemu-aarch64: the cross-compiled self-test picks the path each CPU model allows and every
available path equals the scalar reference (exact integer parts, fp32 within 1e-4 of the output scale)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qkiln.kernels.build import build_test_binary

pytestmark = pytest.mark.qemu

CC = "aarch64-linux-gnu-gcc"
SYSROOT = Path("/usr/aarch64-linux-gnu")
SELFTEST = Path(__file__).parent / "kernel_selftest.c"

# (qemu -cpu, the path the dispatcher must choose, the paths that must be reported available)
CPUS = [
    ("cortex-a72", "neon", {"scalar", "neon"}),
    ("neoverse-n1", "dotprod", {"scalar", "neon", "dotprod"}),
    ("a64fx", "sve", {"scalar", "neon", "sve"}),
    ("max", "i8mm", {"scalar", "neon", "dotprod", "i8mm", "sve"}),
    ("max,sve-default-vector-length=16", "i8mm", {"scalar", "neon", "dotprod", "i8mm", "sve"}),
    ("max,sve-default-vector-length=32", "i8mm", {"scalar", "neon", "dotprod", "i8mm", "sve"}),
]
SVE_BYTES = {"a64fx": 64, "max": 64, "max,sve-default-vector-length=16": 16, "max,sve-default-vector-length=32": 32}


@pytest.fixture(scope="module")
def arm_binary(tmp_path_factory) -> Path:
    if shutil.which(CC) is None or shutil.which("qemu-aarch64") is None or not SYSROOT.exists():
        pytest.skip(f"needs {CC}, libc6-dev-arm64-cross and qemu-user (scripts/setup.sh test installs them)")
    return build_test_binary(tmp_path_factory.mktemp("arm") / "qk_selftest", CC, "aarch64", SELFTEST)


@pytest.mark.parametrize(("cpu", "expect", "available"), CPUS, ids=[c[0] for c in CPUS])
def test_selftest_under_qemu(arm_binary, cpu, expect, available):
    r = subprocess.run(["qemu-aarch64", "-L", str(SYSROOT), "-cpu", cpu, str(arm_binary)],
                       capture_output=True, text=True, timeout=300)
    head = re.search(r"^auto=(\w+) sve_bytes=(\d+) available=([\w,]*)$", r.stdout, re.M)
    assert head, r.stdout + r.stderr
    assert head.group(1) == expect, f"{cpu} chose {head.group(1)}"
    assert set(filter(None, head.group(3).split(","))) == available
    assert int(head.group(2)) == SVE_BYTES.get(cpu, 0)
    assert r.returncode == 0, r.stdout
    assert re.search(r"checks=\d+ failures=0", r.stdout)
    for path in available:
        assert f"path {path}: ok" in r.stdout


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "arm"


ARM_PYTHON = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qkiln" / "arm64-python" / "root"


@pytest.fixture(scope="module")
def arm_python(arm_binary) -> None:
    """Debian's arm64 python3.11 + numpy, unpacked into ~/.cache by setup (scripts/setup.sh test runs
    scripts/arm/fetch_arm_python.sh): the test itself downloads nothing."""
    if not ((ARM_PYTHON / "usr/bin/python3.11").exists() and (ARM_PYTHON / "usr/lib/python3/dist-packages/numpy").is_dir()):
        pytest.skip(f"no arm64 Python in {ARM_PYTHON.parent}; scripts/setup.sh test (or scripts/arm/fetch_arm_python.sh) "
                    "puts it there")


def test_python_level_kernels_under_qemu(arm_python, monkeypatch):
    """qkiln.kernels.api from an aarch64 Python with NumPy: every allowed path equals the NumPy reference."""
    import sys

    monkeypatch.delenv("QKILN_KERNEL", raising=False)  # the run picks each CPU's best path, whatever is exported
    cpus = {"cortex-a72": "neon", "neoverse-n1": "dotprod", "a64fx": "sve", "max": "i8mm"}
    r = subprocess.run([str(SCRIPTS / "run_arm_python.sh"), *cpus], capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    for cpu, path in cpus.items():
        assert re.search(rf"^cpu={re.escape(cpu)} machine=aarch64 .* auto={path} ", r.stdout, re.M), r.stdout
    assert r.stdout.count("python-check ok") == len(cpus)
    assert "path numpy: ok" in r.stdout
