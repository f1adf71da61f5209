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
