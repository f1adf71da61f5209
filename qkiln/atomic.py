"""Write outputs beside their destination and rename only when complete.

A failed or interrupted run never leaves a half-written artifact where a CI job would ship it:
the temporary path starts with `.` + name + `.partial-` + the writer's pid and is removed on any exception.
A run killed outright (SIGKILL, power loss) cannot clean up after itself; the next write of the same
destination removes the temporaries whose writer process no longer exists.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from qkiln.errors import UserError


def _check_parent_writable(dest: Path) -> Path:
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise UserError(f"cannot write {dest}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {dest}: folder {parent} is not writable; choose another output path")
    return parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(parent: Path, name: str) -> None:
    """Remove `.NAME.partial-PID-*` / `.NAME.old-PID-*` left by a writer that was killed (PID gone)."""
    for kind in ("partial", "old"):
        for p in parent.glob(f".{name}.{kind}-*"):
            pid = p.name[len(f".{name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def _prefix(dest: Path, kind: str) -> str:
    return f".{dest.name}.{kind}-{os.getpid()}-"


@contextlib.contextmanager
def atomic_file(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary file path in dest's folder; on success fsync and rename it onto dest."""
    dest = Path(dest)
    parent = _check_parent_writable(dest)
    _remove_stale(parent, dest.name)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(dest, "partial"), dir=parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder in dest's parent; on success rename it onto dest.

    An existing dest is refused unless `overwrite` is set, in which case it is replaced only once
    the new folder is complete.
    """
    dest = Path(dest)
    parent = _check_parent_writable(dest)
    if dest.exists() and not overwrite:
        raise UserError(f"output {dest} already exists; remove it or pass --force")
    _remove_stale(parent, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(dest, "partial"), dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=_prefix(dest, "old"), dir=parent))
            os.replace(dest, old / "x")
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
