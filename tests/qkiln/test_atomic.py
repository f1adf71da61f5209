from __future__ import annotations

import os

import pytest

from qkiln.atomic import atomic_dir, atomic_file
from qkiln.errors import UserError


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name or ".old-" in p.name)


def test_atomic_file_appears_only_when_complete(tmp_path):
    dest = tmp_path / "a.bin"
    with atomic_file(dest) as tmp:
        tmp.write_bytes(b"abc")
        assert not dest.exists()
    assert dest.read_bytes() == b"abc" and leftovers(tmp_path) == []


def test_atomic_file_failure_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(dest) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert dest.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_atomic_dir_refuses_existing_unless_overwrite(tmp_path):
    dest = tmp_path / "out"
    with atomic_dir(dest) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(UserError, match="already exists"), atomic_dir(dest):
        pass
    with atomic_dir(dest, overwrite=True) as tmp:
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in dest.iterdir()) == ["y"] and leftovers(tmp_path) == []


def test_atomic_dir_failure_leaves_nothing(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), atomic_dir(dest) as tmp:
        (tmp / "x").write_text("1")
        raise KeyboardInterrupt
    assert not dest.exists() and leftovers(tmp_path) == []


def test_missing_or_readonly_parent_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"), atomic_file(tmp_path / "nope" / "a.bin"):
        pass
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root ignores permissions)")
        with pytest.raises(UserError, match="not writable"), atomic_file(ro / "a.bin"):
            pass
    finally:
        ro.chmod(0o700)


def test_a_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    """SIGKILL leaves `.NAME.partial-PID-*` behind (nothing can run on SIGKILL); the next write of the same
    destination removes the ones whose PID is gone and leaves a live writer's alone."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    for dest_name, maker in (("out", atomic_dir), ("a.bin", atomic_file)):
        stale = tmp_path / f".{dest_name}.partial-{dead_pid}-abc"
        stale.mkdir() if dest_name == "out" else stale.write_bytes(b"half")
        old = tmp_path / f".{dest_name}.old-{dead_pid}-def"
        old.mkdir()
        live = tmp_path / f".{dest_name}.partial-1-xyz"  # pid 1 always exists
        live.mkdir()
        with maker(tmp_path / dest_name) as tmp:
            (tmp / "x").write_text("1") if dest_name == "out" else tmp.write_bytes(b"1")
        assert not stale.exists() and not old.exists() and live.exists()
        live.rmdir()
    assert leftovers(tmp_path) == []
