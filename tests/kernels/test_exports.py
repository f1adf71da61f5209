"""The kernel library's public surface is its header: the shared object exports exactly the functions
qkiln_kernels.h declares (everything else is built hidden), and every C function the Python ctypes tables
bind is one of them."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qkiln.kernels import build

HEADER = build.INCLUDE / "qkiln_kernels.h"
PY_DIR = build.HERE  # qkiln/kernels/*.py: api, attention, bf16, decode, elementwise, gptq ...


def header_functions() -> set[str]:
    """Names of the functions qkiln_kernels.h declares (comments stripped first)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    declared = set(re.findall(r"^QK_API\b[^;(]*?\b(qk_\w+)\s*\(", text, flags=re.M))
    assert declared, "no QK_API declarations found in the header"
    return declared


def python_bound_functions() -> set[str]:
    """C names the Python modules bind: keys of their ctypes tables ("qk_x": ...) and lib.qk_x attributes."""
    names: set[str] = set()
    for py in PY_DIR.glob("*.py"):
        src = py.read_text()
        names |= set(re.findall(r"\"(qk_\w+)\"\s*:", src))
        names |= set(re.findall(r"(?:lib|_lib|_library\(\))\.(qk_\w+)", src))
    return names


def exported_functions(lib: Path) -> set[str]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    return {parts[2] for parts in (line.split() for line in out.stdout.splitlines())
            if len(parts) == 3 and parts[1] in ("T", "W")}


def test_python_binds_only_declared_functions():
    bound = python_bound_functions()
    assert {"qk_gemm", "qk_rms_norm", "qk_causal_attention_ex", "qk_gptq_scan", "qk_bf16_linear_ex",
            "qk_decode_token"} <= bound, "the scan of the ctypes tables found too little"
    assert bound - header_functions() == set()


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) is not installed")
def test_library_exports_exactly_the_header():
    try:
        lib = build.build_library()
    except build.BuildError as e:
        pytest.skip(f"the kernel library does not build here: {e}")
    exported = exported_functions(lib)
    declared = header_functions()
    assert exported - declared == set(), "exported but not declared (missing QK_API in the header, or not hidden)"
    assert declared - exported == set(), "declared but not exported"


def header_enum(name: str) -> dict[str, int]:
    """`enum NAME { A = 1, B = 2, ... }` of qkiln_kernels.h as {A: 1, ...}."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    body = re.search(rf"enum {name}\s*\{{(.*?)\}}", text, flags=re.S)
    assert body, f"enum {name} not found in the header"
    return {m[1]: int(m[2]) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", body.group(1))}


def test_weight_type_ids_are_the_headers():
    """Python's WType and the header's qk_wtype are one table: every type the kernels take (Q5_0, Q4_1 and
    Q5_1 included) has the same id on both sides, and that id is ggml's where ggml has the type."""
    from gguf.constants import GGMLQuantizationType

    from qkiln.kernels.types import BLOCK, WType

    assert header_enum("qk_wtype") == {f"QK_{t.name}": int(t) for t in WType}
    for t in BLOCK:
        assert int(GGMLQuantizationType[t.name]) == int(t)
    assert {"Q5_0", "Q4_1", "Q5_1"} <= {t.name for t in BLOCK}
