"""The target-ISA check: the artifact's logits from qkiln's aarch64 kernels under `qemu-aarch64 -cpu MODEL`
equal the host's within a stated tolerance — evidence that the code a Graviton or a phone runs gives the
numbers the accuracy report shows.

Both sides run the same program (validate/isa_runner.py, as `python -P -m qkiln.validate.isa_runner`) on the
same bundle: the GGUF's packed rows as stored, its float tensors and a few token windows. The kernels'
integer parts are exact on every path and their float sums differ only in order. That order still moves some
activations across an int8 rounding boundary, and 30 layers carry it on: on the demo model's Q4_0, the
host's own AVX-512 and scalar paths differ by a mean KL of about 0.005 nats (max |diff| about 6% of the
largest logit), and every Arm path by the same amount. So the check is stated as the metrics are: mean
KL(P_host || P_target) over the windows' positions, gated by the recipe's `max_isa_kl` (0.02 by default, 4x
that spread); a kernel that is wrong on one ISA moves it by orders of magnitude
(tests/validate/test_isa_check.py breaks one on purpose).

Needs Debian's gcc-aarch64-linux-gnu, libc6-dev-arm64-cross and qemu-user, and an aarch64 Python with NumPy
unpacked by scripts/arm/fetch_arm_python.sh (scripts/setup.sh test runs it). Missing pieces make the check
"not run" with the reason, never a silent pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

import qkiln
from qkiln.formats.gguf_import import config_from_gguf
from qkiln.formats.gguf_model import GGUFSource, packed_linears_from_gguf
from qkiln.formats.gguf_read import read_gguf
from qkiln.kernels.build import build_library
from qkiln.validate import isa_runner
from qkiln.validate.metrics import log_softmax

CC = "aarch64-linux-gnu-gcc"
SYSROOT = Path("/usr/aarch64-linux-gnu")
DEFAULT_TOLERANCE = 0.02  # nats of mean KL(host || target); see the module docstring
RUNNER = isa_runner.__name__  # run as `python -P -m` on both sides: the package's folder is not put on sys.path


@dataclasses.dataclass(frozen=True)
class IsaResult:
    cpu: str  # the qemu -cpu model
    ran: bool
    reason: str  # why not run, or a one-line summary
    kernel_path: str | None = None  # the path the dispatcher chose under qemu
    host_kernel_path: str | None = None
    mean_kl: float | None = None  # mean KL(P_host || P_target) per position, nats
    top1_agreement: float | None = None  # share of positions whose argmax is the same
    rel_diff: float | None = None  # max |diff| / max |logit|, for information
    windows: int = 0
    ctx: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def arm_python_root() -> Path:
    base = os.environ.get("QKILN_ARM_PYTHON") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "qkiln", "arm64-python")
    return Path(base) / "root"


def missing_tools() -> str | None:
    """Why the check cannot run here, or None."""
    if shutil.which(CC) is None or shutil.which("qemu-aarch64") is None or not SYSROOT.exists():
        return f"needs {CC}, libc6-dev-arm64-cross and qemu-user (scripts/setup.sh test installs them)"
    if not (arm_python_root() / "usr/bin/python3.11").exists():
        return "needs the aarch64 Python + NumPy (run scripts/arm/fetch_arm_python.sh once)"
    return None


def export_bundle(gguf: Path, windows: np.ndarray, dest: Path) -> None:
    """The GGUF as the runner reads it: packed rows (.npy uint8) per linear, float tensors, windows."""
    dest.mkdir(parents=True, exist_ok=True)
    f = read_gguf(gguf)
    cfg = config_from_gguf(f)
    source = GGUFSource(f, cfg)
    packed = packed_linears_from_gguf(source)
    meta: dict[str, Any] = {"config": cfg.to_dict(), "names": source.names(), "packed": {}, "dense": {}}
    for i, (module, lin) in enumerate(sorted(packed.items())):
        fname = f"p{i}.npy"
        np.save(dest / fname, lin.data)
        meta["packed"][module] = {"wtype": int(lin.wtype), "out": lin.out_features, "in": lin.in_features, "file": fname}
    plugged = {f"{m}.weight" for m in packed if m != "lm_head"}
    for i, name in enumerate(n for n in source.names() if n not in plugged):
        fname = f"d{i}.npy"
        np.save(dest / fname, np.ascontiguousarray(source.tensor(name), dtype=np.float32))
        meta["dense"][name] = fname
    np.save(dest / "windows.npy", np.ascontiguousarray(windows, dtype=np.int64))
    (dest / "meta.json").write_text(json.dumps(meta, sort_keys=True))


def _package_tree(dest: Path) -> Path:
    """What the runner imports, and only that, rebuilt with symlinks for the aarch64 Python (which has NumPy):
    qkiln's top-level modules and the packages in isa_runner.QKILN_PACKAGES (package-dir puts them in separate
    folders), gguf-py's isa_runner.GGUF_MODULES under an empty gguf/__init__.py, and the ml_dtypes stand-in."""
    root = dest / "pkg"
    pkg = root / "qkiln"
    pkg.mkdir(parents=True)
    assert qkiln.__file__ is not None
    for f in Path(qkiln.__file__).parent.glob("*.py"):
        (pkg / f.name).symlink_to(f)
    for name in isa_runner.QKILN_PACKAGES:
        sub = importlib.import_module(name)
        assert sub.__file__ is not None
        (pkg / name.removeprefix("qkiln.")).symlink_to(Path(sub.__file__).parent)
    (root / "gguf").mkdir()
    (root / "gguf" / "__init__.py").write_text("")
    assert gguf.__file__ is not None
    for mod in isa_runner.GGUF_MODULES:
        (root / "gguf" / f"{mod}.py").symlink_to(Path(gguf.__file__).with_name(f"{mod}.py"))
    (root / "ml_dtypes.py").write_text(ML_DTYPES_STUB)
    return root


# Debian 12 has no arm64 ml_dtypes. The evaluation forward never stores bfloat16 (only calibration does); the
# kernels merely compare dtypes with it. A structured stand-in compares unequal to every float dtype, and any
# real cast to it raises instead of computing something else.
ML_DTYPES_STUB = '''"""Stand-in for ml_dtypes under qemu (see qkiln.validate.isa_check): bfloat16 never matches a float dtype."""
import numpy as np

bfloat16 = np.dtype([("bfloat16_unavailable_under_qemu", "<u2")])
'''


def cross_library(dest: Path) -> Path:
    """The kernels cross-compiled for aarch64 (the same sources and flags as the host's library)."""
    return build_library(CC, "aarch64")


def run_on_qemu(bundle: Path, cpu: str, out: Path, *, library: Path, timeout: float = 1800) -> str:
    """Run the runner under qemu-aarch64 -cpu `cpu`; returns its stdout line; RuntimeError on failure."""
    root = arm_python_root()
    lib = root / "usr/lib/aarch64-linux-gnu"
    pkg = _package_tree(bundle.parent / f"tree-{abs(hash(cpu))}")
    cmd = ["qemu-aarch64", "-L", str(SYSROOT), "-cpu", cpu,
           "-E", f"LD_LIBRARY_PATH={lib}:{lib}/blas:{lib}/lapack:{root}/lib/aarch64-linux-gnu",
           "-E", f"PYTHONHOME={root}/usr", "-E", f"PYTHONPATH={pkg}:{root}/usr/lib/python3/dist-packages",
           "-E", f"QKILN_KERNELS_LIB={library}", "-E", "PYTHONDONTWRITEBYTECODE=1", "-E", "QKILN_KERNEL=",
           str(root / "usr/bin/python3.11"), "-P", "-m", RUNNER, str(bundle), str(out)]
    env = {k: v for k, v in os.environ.items() if k != "QKILN_KERNEL"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"qemu-aarch64 -cpu {cpu} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


def run_on_host(bundle: Path, out: Path) -> str:
    """The same runner on this machine (a subprocess, so the kernel path is chosen as a fresh process does)."""
    env = {k: v for k, v in os.environ.items() if k != "QKILN_KERNEL"}
    r = subprocess.run([sys.executable, "-P", "-m", RUNNER, str(bundle), str(out)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"host run failed: {(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout.strip().splitlines()[-1]


def compare(host: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """(mean KL(host || target), top-1 agreement, max |diff| / max |host|); host/target (n, ctx, vocab)."""
    scale = float(np.max(np.abs(host))) or 1.0
    rel = float(np.max(np.abs(target.astype(np.float64) - host))) / scale
    kls = []
    for h, t in zip(host, target, strict=True):  # one window at a time: (ctx, vocab) in float64
        lh, lt = log_softmax(h), log_softmax(t)
        kls.append((np.exp(lh) * (lh - lt)).sum(-1))
    agree = float((host.argmax(-1) == target.argmax(-1)).mean())
    return float(np.concatenate(kls).mean()), agree, rel


def isa_check(gguf: Path, windows: np.ndarray, cpu: str, *, tolerance: float = DEFAULT_TOLERANCE,
              library: Path | None = None, workdir: Path | None = None) -> IsaResult:
    """Run `gguf` on `windows` (n, ctx) under qemu-aarch64 -cpu `cpu` and on the host; compare the logits.

    `library` replaces the cross-compiled kernels (tests pass a deliberately broken one)."""
    why = missing_tools()
    if why:
        return IsaResult(cpu, False, f"not run: {why}", windows=len(windows), ctx=windows.shape[1])
    with tempfile.TemporaryDirectory(prefix="qkiln-isa-", dir=workdir) as tmp:
        bundle = Path(tmp) / "bundle"
        export_bundle(gguf, windows, bundle)
        lib = library or cross_library(Path(tmp))
        host_line = run_on_host(bundle, Path(tmp) / "host.npy")
        line = run_on_qemu(bundle, cpu, Path(tmp) / "target.npy", library=lib)
        host = np.load(Path(tmp) / "host.npy")
        target = np.load(Path(tmp) / "target.npy")
    kl, agree, rel = compare(host, target)
    path = line.split()[0].split("=", 1)[1]
    host_path = host_line.split()[0].split("=", 1)[1]
    ok = kl <= tolerance
    summary = (f"{path} kernels under qemu -cpu {cpu} vs host {host_path}: mean KL {kl:.2e} nats "
               f"({'within' if ok else 'OUTSIDE'} {tolerance:g}), top-1 agreement {100 * agree:.1f}%")
    return IsaResult(cpu, True, summary, path, host_path, kl, agree, rel, len(windows), int(windows.shape[1]))
