"""The ISA check's runner (validate/isa_runner.py) imports only what the aarch64 Python under qemu is given: the
package tree isa_check builds for it, and NumPy. Checked on the host with the same tree and a sys.path that
holds nothing else (no site-packages), so an import that would fail only under qemu fails here first, without
the cross toolchain tests/validate/test_isa_check.py needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from qkiln.validate.isa_check import RUNNER, _package_tree


def test_runner_imports_with_only_the_qemu_tree_and_numpy(tmp_path):
    tree = _package_tree(tmp_path / "tree")
    numpy_only = tmp_path / "numpy-only"
    numpy_only.mkdir()
    (numpy_only / "numpy").symlink_to(Path(np.__file__).parent)
    code = (f"import sys; sys.path[:0] = [{str(tree)!r}, {str(numpy_only)!r}]; import {RUNNER}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('gguf', 'ml_dtypes', 'qkiln')))")
    # -I: no PYTHONPATH, no user site, no script folder; -S: no site-packages
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "qkiln.runtime.llama" in r.stdout and "qkiln.kernels.linear" in r.stdout
