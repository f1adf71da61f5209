"""The target-ISA check under qemu-aarch64: the artifact's logits from qkiln's aarch64 kernels match the host's
on graviton2 (neoverse-n1), graviton3 (SVE 256) and mobile-arm64 (cortex-a76) CPU models, and a kernel that
is wrong only on one ISA (dotprod) is caught there while another ISA (plain NEON) still passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from qkiln.targets.recipe import load_recipe
from qkiln.validate.isa_check import CC, DEFAULT_TOLERANCE, isa_check, missing_tools

pytestmark = pytest.mark.qemu

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.fixture(autouse=True)
def _tools():
    why = missing_tools()
    if why:
        pytest.skip(why)


@pytest.fixture
def tiny_gguf(make_checkpoint, tmp_path) -> Path:
    """A Q4_0 GGUF of the tiny random model (two layers, hidden 64): every linear on the Q4_0 kernels."""
    from qkiln.pipeline.convert import convert_to_gguf

    out = tmp_path / "q4_0.gguf"
    convert_to_gguf(make_checkpoint(), out, "q4_0", uniform=True)
    return out


def windows() -> np.ndarray:
    return np.random.default_rng(0).integers(3, 512, (2, 16), dtype=np.int64)  # (n, ctx) ids of the tiny vocab


@pytest.mark.parametrize(("recipe", "path"), [("graviton2", "dotprod"), ("graviton3", "i8mm"), ("mobile-arm64", "dotprod")])
def test_recipe_cpu_model_matches_the_host(recipe, path, tiny_gguf, tmp_path):
    cpu = load_recipe(RECIPES / f"{recipe}.toml").target.qemu_cpu
    assert cpu
    r = isa_check(tiny_gguf, windows(), cpu, workdir=tmp_path)
    assert r.ran, r.reason
    assert r.kernel_path == path, r.reason
    assert r.mean_kl is not None and r.mean_kl <= DEFAULT_TOLERANCE, r.reason
    assert r.top1_agreement is not None and r.top1_agreement >= 0.9


def broken_dotprod_library(dest: Path) -> Path:
    """The aarch64 kernels with ONE fault, a lane bug: the dotprod inner product ignores the upper 8 of every 16
    activations. NEON, i8mm and SVE are untouched, so only a CPU whose best path is dotprod computes wrong logits."""
    from qkiln.kernels import build

    src = dest / "src"
    shutil.copytree(build.SRC, src)
    f = src / "aarch64" / "dotprod.c"
    text = f.read_text()
    good = "return vdotq_s32(acc, w, a);"
    assert good in text
    f.write_text(text.replace(good, "return vdotq_s32(acc, w, vcombine_s8(vget_low_s8(a), vdup_n_s8(0)));"))
    lib = dest / "libqkiln_kernels_broken.so"
    saved = build.SRC
    build.SRC = src
    try:
        build._compile(CC, "aarch64", lib, shared=True)
    finally:
        build.SRC = saved
    return lib


def test_a_kernel_wrong_only_on_dotprod_is_caught_on_that_isa_only(tiny_gguf, tmp_path):
    lib = broken_dotprod_library(tmp_path)
    wrong = isa_check(tiny_gguf, windows(), "neoverse-n1", library=lib, workdir=tmp_path)
    assert wrong.ran and wrong.kernel_path == "dotprod"
    assert wrong.mean_kl is not None and wrong.mean_kl > 10 * DEFAULT_TOLERANCE, wrong.reason
    assert "OUTSIDE" in wrong.reason
    fine = isa_check(tiny_gguf, windows(), "cortex-a72", library=lib, workdir=tmp_path)  # NEON: not broken
    assert fine.ran and fine.kernel_path == "neon"
    assert fine.mean_kl is not None and fine.mean_kl <= DEFAULT_TOLERANCE, fine.reason
