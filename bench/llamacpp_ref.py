"""llama.cpp's command-line tools built for the CPU at hand: the speed and accuracy reference for bench/.

    python bench/llamacpp_ref.py [--print-flags] [--cpuinfo FILE]

Why its own build: the llama-cpp-python wheel the tests use is built with -DGGML_NATIVE=OFF and nothing else,
i.e. AVX2 only, which makes llama.cpp slower than it is on an AVX-512 machine and so flatters qkiln. Machines
change CPU between sessions, so the ISA flags come from /proc/cpuinfo each time and are part of the cache key:
a new CPU gets a new build, the same CPU reuses the old one.

How: `pip download --no-deps --no-binary :all: llama-cpp-python==<pin>` (the pin is the one in
requirements/llama-cpp.txt, the same sources the tests' wheel is built from) into qkiln's cache folder,
unpack it, and build llama-bench, llama-perplexity, llama-imatrix and llama-quantize from its
vendor/llama.cpp with cmake (Release, static, -j2), -DGGML_NATIVE=OFF plus one explicit -DGGML_<ISA>=ON per
extension the CPU reports. Never AMX and never GGML_NATIVE=ON: 0.3.36 built that way segfaults on every
quantized file on an AMX Xeon (DESIGN.md). The tools land in
~/.cache/qkiln/llamacpp/<version>-<flags hash>/bin; a `.complete` marker says the build finished, and a
killed build resumes where cmake left off.

`tools()` is what the other benchmarks call: it builds when needed and returns the bin folder and the flags.
Progress goes to stderr; the CLI prints one JSON document ({"bin", "flags", "version", "build_seconds"}).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIN_FILE = REPO / "requirements" / "llama-cpp.txt"
TOOLS = ("llama-bench", "llama-perplexity", "llama-imatrix", "llama-quantize")

# /proc/cpuinfo flag(s) -> ggml's cmake option, in the order ggml lists them. A cmake option is turned on only
# when every flag it needs is present (GGML_AVX512 compiles with -mavx512f/cd/vl/dq/bw together) and is passed
# as OFF otherwise: with GGML_NATIVE=OFF ggml turns SSE4.2/AVX/AVX2/BMI2/FMA/F16C ON by default, which would
# give a CPU without them a build it cannot run.
ISA_OPTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("GGML_SSE42", ("sse4_2",)),
    ("GGML_AVX", ("avx",)),
    ("GGML_AVX2", ("avx2",)),
    ("GGML_BMI2", ("bmi2",)),
    ("GGML_AVX_VNNI", ("avx_vnni",)),
    ("GGML_FMA", ("fma",)),
    ("GGML_F16C", ("f16c",)),
    ("GGML_AVX512", ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")),
    ("GGML_AVX512_VBMI", ("avx512f", "avx512vbmi")),
    ("GGML_AVX512_VNNI", ("avx512f", "avx512_vnni")),
    ("GGML_AVX512_BF16", ("avx512f", "avx512_bf16")),
)
# Always off, whatever the CPU has (see the module docstring).
NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pinned_version(pin_file: Path = PIN_FILE) -> str:
    """The llama-cpp-python version the project pins (requirements/llama-cpp.txt)."""
    m = re.search(r"^llama-cpp-python==(\S+)", pin_file.read_text(), re.M)
    if not m:
        raise SystemExit(f"{pin_file} names no llama-cpp-python==VERSION")
    return m.group(1)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The first processor's `flags` line of a /proc/cpuinfo text, as a set."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def ggml_options(flags: set[str]) -> list[str]:
    """cmake -D options for a CPU with these /proc/cpuinfo flags: GGML_NATIVE=OFF, each ISA option ON where the
    CPU has it and OFF where not, AMX OFF."""
    isa = [f"-D{opt}={'ON' if all(f in flags for f in need) else 'OFF'}" for opt, need in ISA_OPTIONS]
    return ["-DGGML_NATIVE=OFF", *isa, *(f"-D{opt}=OFF" for opt in NEVER)]


def enabled(options: list[str]) -> list[str]:
    """The options of `ggml_options` that are ON (the short form to print)."""
    return [o for o in options if o.endswith("=ON")]


def build_key(version: str, options: list[str]) -> str:
    """Cache folder name: the version, then a hash of the flag set (order-independent)."""
    digest = hashlib.sha256("\n".join(sorted(options)).encode()).hexdigest()[:12]
    return f"{version}-{digest}"


def _run(cmd: list[str]) -> None:
    """Run a build step; what it prints goes to stderr (stdout carries only the JSON document)."""
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def _sdist(version: str, folder: Path) -> Path:
    """The llama-cpp-python sdist in `folder`, downloaded with pip when not there yet."""
    name = f"llama_cpp_python-{version}.tar.gz"
    path = folder / name
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps", "--no-binary", ":all:",
              "-d", str(folder), f"llama-cpp-python=={version}"])
    if not path.exists():
        raise SystemExit(f"pip download did not produce {path}")
    return path


def _unpack(sdist: Path, dest: Path) -> Path:
    """vendor/llama.cpp of the unpacked sdist (unpacked once)."""
    top = dest / sdist.name.removesuffix(".tar.gz")
    src = top / "vendor" / "llama.cpp"
    if not (src / "CMakeLists.txt").exists():
        # unpacked beside, renamed when whole: a killed unpack never looks like sources to build
        shutil.rmtree(top, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(tmp / top.name, top)
        shutil.rmtree(tmp, ignore_errors=True)
    if not (src / "CMakeLists.txt").exists():
        raise SystemExit(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    return src


def tools(cpuinfo: str | None = None, *, jobs: int = 2) -> tuple[Path, list[str]]:
    """(bin folder holding TOOLS, the cmake ISA options used), building llama.cpp when this CPU has no build yet."""
    from qkiln.demo import cache_dir

    if cpuinfo is None:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    version = pinned_version()
    options = ggml_options(cpu_flags(cpuinfo))
    root = cache_dir() / "llamacpp"
    folder = root / build_key(version, options)
    root.mkdir(parents=True, exist_ok=True)
    # One build at a time: a second benchmark started meanwhile waits here and then reuses the build.
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(version, options, root, folder, jobs)


def _build(version: str, options: list[str], root: Path, folder: Path, jobs: int) -> tuple[Path, list[str]]:
    bin_dir = folder / "bin"
    if (folder / ".complete").exists():
        log(f"llama.cpp {version} for this CPU: {bin_dir} (built before; flags {' '.join(options)})")
        return bin_dir, options
    log(f"building llama.cpp {version} (llama-cpp-python sdist) with {' '.join(options)}")
    t0 = time.perf_counter()
    src = _unpack(_sdist(version, root / "sdist"), folder)
    build = folder / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(src), "-B", str(build), *gen, "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
          "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_TOOLS=ON", "-DGGML_OPENMP=ON", *options])
    _run(["cmake", "--build", str(build), "--config", "Release", "-j", str(jobs), "--target", *TOOLS])
    bin_dir.mkdir(exist_ok=True)
    for name in TOOLS:
        built = build / "bin" / name
        if not built.exists():
            raise SystemExit(f"the build made no {built}")
        shutil.copy2(built, bin_dir / name)
    seconds = round(time.perf_counter() - t0, 1)
    load = os.getloadavg()
    (folder / "flags.json").write_text(json.dumps({"version": version, "options": options, "build_seconds": seconds,
                                                   "load_average": [round(x, 2) for x in load]}, indent=2) + "\n")
    (folder / ".complete").write_text("")
    log(f"built in {seconds} s (load average {load[0]:.1f}): {bin_dir}")
    return bin_dir, options


def run_measured(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[dict, str, str]:
    """Run `cmd` as a child process (`env` added to this one's environment): (its wall seconds, CPU seconds and
    peak RSS from wait4 and the load average after it, its stdout, its stderr). A failure stops the benchmark
    with the tail of what the child said."""
    t0 = time.perf_counter()
    with open(os.devnull, "rb") as null, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, stdin=null,
                                env={**os.environ, **env} if env else None)
        assert proc.stdout is not None
        out = proc.stdout.read().decode(errors="replace")
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err_text = err.read().decode(errors="replace")
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-1500:]}\n{err_text[-3000:]}")
    return ({"seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
             "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_average": round(os.getloadavg()[0], 1)},
            out, err_text)


# The tools are built with OpenMP (llama-cpp-python's default). GNU OpenMP threads spin at a barrier before they
# sleep; on a host with more runnable threads than cores, a spinning thread holds the core its partner needs, and
# llama.cpp with 2 threads decoded the demo model at ~3 tokens/s here against ~21 with 1 thread and ~40 with
# passive waiting. Benchmarks run the tools with this environment (and also without it, to show the difference)
# so that a busy host does not make llama.cpp look slow.
PASSIVE_OMP = {"OMP_WAIT_POLICY": "passive"}


def build_info(bin_dir: Path) -> dict:
    """flags.json written beside bin/ by the build (version, options, build seconds, load average then)."""
    p = bin_dir.parent / "flags.json"
    return json.loads(p.read_text()) if p.exists() else {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpuinfo", type=Path, default=Path("/proc/cpuinfo"), help="read the CPU's flags from this file")
    ap.add_argument("--print-flags", action="store_true", help="print the cmake options for this CPU and stop")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    args = ap.parse_args()
    cpuinfo = args.cpuinfo.read_text()
    if args.print_flags:
        print(" ".join(ggml_options(cpu_flags(cpuinfo))))
        return
    bin_dir, options = tools(cpuinfo, jobs=args.jobs)
    print(json.dumps({"bin": str(bin_dir), "flags": options, **build_info(bin_dir)}, indent=2))


if __name__ == "__main__":
    main()
