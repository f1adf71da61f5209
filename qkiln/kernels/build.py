"""Compile the C kernels with the system C compiler into a per-user cache, keyed by a hash of the sources,
flags and compiler, so the first use builds once and every later process just loads the shared object.

Why at first use instead of in the wheel: the package stays pure Python (installable anywhere), and a machine
without a compiler still works through the NumPy path. Flags are fixed (no -march=native), so the same
sources give the same library on every machine of an architecture; per-file ISA flags keep the baseline
files runnable on any CPU of the architecture, and the dispatcher only calls a file after checking the CPU.

    python -m qkiln.kernels.build                      build (or find) the host library, print its path
    python -m qkiln.kernels.build --arch aarch64 --cc aarch64-linux-gnu-gcc --test-binary OUT
                                                       cross-compile the C self-test for qemu
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
INCLUDE = HERE / "include"
LIB_NAME = "libqkiln_kernels.so"

# Shared by every file: optimized, no fast-math, no FMA contraction in plain C (the scalar reference's
# rounding is part of its definition), position independent for the shared object, and hidden symbols: the
# library exports only what include/qkiln_kernels.h declares with QK_API.
COMMON_FLAGS = ["-O3", "-std=gnu11", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-Wall", "-Wextra",
                "-Wno-unused-parameter", "-pthread", "-fvisibility=hidden"]


@dataclass(frozen=True)
class Unit:
    """One translation unit and the ISA flags it alone is compiled with."""

    path: str  # relative to src/
    flags: tuple[str, ...] = ()


UNITS: dict[str, tuple[Unit, ...]] = {
    "x86_64": (
        Unit("dispatch.c", ("-DQK_WITH_AVX512",)),
        Unit("cpu.c"),
        Unit("threads.c"),
        Unit("quantize_act.c"),
        Unit("repack.c"),
        Unit("bandwidth.c"),
        Unit("fallback/scalar.c"),
        Unit("decode.c"),
        Unit("x86/avx2.c", ("-mavx2", "-mfma", "-mf16c")),
        Unit("x86/avx512.c", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c")),
        Unit("x86/gemm_avx2.c", ("-mavx2", "-mfma", "-mf16c")),
        Unit("x86/gemm_avx512.c", ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma",
                                   "-mf16c")),
        Unit("x86/quantize_act_avx512.c", ("-mavx512f",)),
        Unit("x86/bf16.c", ("-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16", "-mavx512bw", "-mavx512vl")),
        Unit("attention/attention.c"),
        Unit("attention/attention_avx512.c", ("-mavx512f", "-mfma")),
        Unit("attention/attention_avx2.c", ("-mavx2", "-mfma")),
        Unit("attention/attention_bf16.c", ("-mamx-tile", "-mamx-bf16", "-mavx512f", "-mavx512bf16", "-mavx512bw",
                                            "-mavx512vl", "-mfma")),
        Unit("elementwise/elementwise.c"),
        Unit("elementwise/elementwise_avx512.c", ("-mavx512f",)),
        Unit("gptq/gptq.c"),
        Unit("gptq/gptq_avx512.c", ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2")),
        Unit("gptq/gptq_avx2.c", ("-mavx2",)),
    ),
    "aarch64": (
        Unit("dispatch.c", ("-march=armv8-a",)),
        Unit("cpu.c", ("-march=armv8-a",)),
        Unit("threads.c", ("-march=armv8-a",)),
        Unit("quantize_act.c", ("-march=armv8-a",)),
        Unit("repack.c", ("-march=armv8-a",)),
        Unit("bandwidth.c", ("-march=armv8-a",)),
        Unit("fallback/scalar.c", ("-march=armv8-a",)),
        Unit("decode.c", ("-march=armv8-a",)),
        Unit("aarch64/neon.c", ("-march=armv8-a",)),
        Unit("aarch64/dotprod.c", ("-march=armv8.2-a+dotprod",)),
        Unit("aarch64/i8mm.c", ("-march=armv8.6-a+i8mm",)),
        Unit("aarch64/sve.c", ("-march=armv8.2-a+sve",)),
        Unit("attention/attention.c", ("-march=armv8-a",)),
        Unit("elementwise/elementwise.c", ("-march=armv8-a",)),
        Unit("gptq/gptq.c", ("-march=armv8-a",)),
    ),
}


class BuildError(RuntimeError):
    """The C compiler failed or is missing; callers fall back to the NumPy path."""


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def find_cc() -> str | None:
    """$QKILN_CC (authoritative when set: a missing one means "no compiler"), else $CC, else cc/gcc/clang."""
    forced = os.environ.get("QKILN_CC")
    if forced:
        return forced if shutil.which(forced) else None
    for cand in (os.environ.get("QKILN_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cc_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise BuildError(f"C compiler {cc!r} does not run: {e}") from e


def source_hash(arch: str, cc: str, extra: tuple[str, ...] = ()) -> str:
    """Hash of every source and header, the unit flags and the compiler's version line."""
    h = hashlib.sha256()
    for p in sorted([*SRC.rglob("*.c"), *SRC.rglob("*.h"), *INCLUDE.rglob("*.h")]):
        h.update(str(p.relative_to(HERE)).encode())
        h.update(p.read_bytes())
    h.update(repr((arch, UNITS[arch], COMMON_FLAGS, extra)).encode())
    h.update(_cc_version(cc).encode())
    return h.hexdigest()[:20]


def cache_dir() -> Path:
    base = os.environ.get("QKILN_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qkiln", "kernels")
    return Path(base)


def _compile(cc: str, arch: str, out: Path, *, shared: bool, extra_sources: tuple[Path, ...] = (),
             static: bool = False) -> None:
    """Compile each unit to an object with its own flags, then link; raises BuildError with the log."""
    with tempfile.TemporaryDirectory(prefix="qkiln-cc-") as tmp:
        objs: list[str] = []
        units = [*UNITS[arch], *(Unit(str(p)) for p in extra_sources)]
        for i, u in enumerate(units):
            src = Path(u.path) if Path(u.path).is_absolute() else SRC / u.path
            obj = os.path.join(tmp, f"{i}_{src.stem}.o")
            base_flags = list(u.flags)
            if Path(u.path).is_absolute() and arch == "aarch64":
                base_flags = ["-march=armv8-a"]
            cmd = [cc, *COMMON_FLAGS, *base_flags, f"-I{INCLUDE}", f"-I{SRC}", "-c", str(src), "-o", obj]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise BuildError(f"compiling {u.path} failed:\n{' '.join(cmd)}\n{r.stderr}")
            objs.append(obj)
        link = [cc, "-pthread", *objs, "-o", str(out), "-lm"]
        if shared:
            link.insert(1, "-shared")
        if static:
            link.insert(1, "-static")
        r = subprocess.run(link, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"linking failed:\n{' '.join(link)}\n{r.stderr}")


def build_library(cc: str | None = None, arch: str | None = None, *, force: bool = False) -> Path:
    """Return the path of the cached shared library, compiling it first if needed."""
    arch = arch or host_arch()
    if arch not in UNITS:
        raise BuildError(f"no kernels for architecture {arch!r}")
    cc = cc or find_cc()
    if cc is None:
        raise BuildError("no C compiler found (set QKILN_CC or install gcc)")
    key = source_hash(arch, cc)
    target = cache_dir() / f"{arch}-{key}" / LIB_NAME
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        _compile(cc, arch, Path(tmp), shared=True)
        os.replace(tmp, target)  # atomic: a concurrent process sees the old or the new library, never half
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def build_test_binary(out: Path, cc: str, arch: str, test_source: Path, *, static: bool = False) -> Path:
    """Link the C self-test (tests/kernels/kernel_selftest.c) against every unit; used by scripts/arm."""
    _compile(cc, arch, out, shared=False, extra_sources=(test_source.resolve(),), static=static)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cc", default=None)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--test-binary", type=Path, default=None, help="build the C self-test here instead")
    ap.add_argument("--test-source", type=Path, default=None)
    ap.add_argument("--shared-out", type=Path, default=None, help="also copy the shared library here")
    args = ap.parse_args()
    arch = args.arch or host_arch()
    if args.test_binary:
        cc = args.cc or find_cc()
        assert cc, "no compiler"
        src = args.test_source or (HERE.parents[1] / "tests" / "kernels" / "kernel_selftest.c")
        print(build_test_binary(args.test_binary, cc, arch, src))
        return
    if args.shared_out:
        cc = args.cc or find_cc()
        assert cc, "no compiler"
        _compile(cc, arch, args.shared_out, shared=True)
        print(args.shared_out)
        return
    print(build_library(args.cc, arch, force=args.force))


if __name__ == "__main__":
    main()
