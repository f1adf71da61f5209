"""Speed of the calibration products: NumPy float32, the NumPy bf16 path, the C bf16 paths, torch bf16.

    python bench/bf16_bench.py [--tokens 65536] [--repeats 3] [--threads N]

Shapes are the demo model's (hidden 576, intermediate 1536) at GPTQ's 128 x 512 calibration tokens:
x (T, 576)·W(1536, 576)ᵀ, x (T, 576)·W(576, 576)ᵀ, x (T, 1536)·W(576, 1536)ᵀ, and the Gram xᵀx of
(T, 576) and (T, 1536). Every method is timed in the same run (best of --repeats, wall seconds), the weight
prepared beforehand (packed/rounded/converted) and x converted inside the timing, as calibration does;
the C paths are those that run here (AMX tiles, AVX512_BF16); "<path> out=" writes into one reused output
array (no page zeroing of a fresh output per call).
GFLOPS count 2·m·k·n for a product and 2·m·k² for a Gram (the work of the full product, though the AMX
Gram computes only the upper triangle). Not a test: the machine is shared, so the load average is printed
before and after; compare ratios within one run.

    python bench/bf16_bench.py --calib [--ref-lib OLD.so] [--repeats 5] [--calls 3]

--calib measures the calibration scenario instead: two Python threads at once, each calling the C product
(the fastest C path here)
with nthreads=1 on its own 4096-token x (as quantize/sequential.py's two batch workers do; linear outputs go to
a reused per-thread array, as run_layer lends them), for the layer's
shapes (q/k/v 576->960, o 576->576, gate/up 576->3072, down 1536->576; Gram 576 and 1536). GFLOPS count
both threads' work over the wall time of a round (--calls calls per thread), best of --repeats rounds.
--ref-lib loads another build of the x86/bf16.c symbols (e.g. `git show HEAD:qkiln/kernels/src/x86/bf16.c` compiled
with qkiln/kernels/build.py's flags and -shared) and times it in alternating rounds with the current library, so
both see the same load. The speed-ups printed are ref/new of the best rounds and the median of the ratios of
adjacent rounds ("paired": robust when other work on the machine comes and goes).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from qkiln.kernels import bf16


def _best(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: page faults, thread start, library load
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _torch(threads: int):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _time_linear(x: np.ndarray, w: np.ndarray, torch: Any, args: argparse.Namespace) -> dict[str, float]:
    reps = args.repeats
    t = {"numpy f32": _best(lambda: x @ w.T, reps)}
    wn = bf16.pack_weight(w, path="numpy")
    t["numpy bf16"] = _best(lambda: bf16.linear(x, wn), reps)
    for path in bf16.c_paths():
        wa = bf16.pack_weight(w, path=path)
        t[path] = _best(lambda wa=wa: bf16.linear(x, wa, nthreads=args.threads), reps)
        out = np.empty((x.shape[0], w.shape[0]), np.float32)  # (m, n), reused: no page zeroing per call
        t[f"{path} out="] = _best(lambda wa=wa, out=out: bf16.linear(x, wa, out=out, nthreads=args.threads), reps)
    if torch is not None:
        xt, wt = torch.from_numpy(x), torch.from_numpy(w).to(torch.bfloat16)
        t["torch bf16"] = _best(lambda: torch.nn.functional.linear(xt.to(torch.bfloat16), wt), reps)
    return t


def _time_gram(x: np.ndarray, torch: Any, args: argparse.Namespace) -> dict[str, float]:
    reps = args.repeats
    t = {"numpy f32": _best(lambda: x.T @ x, reps), "numpy bf16": _best(lambda: bf16.gram(x, path="numpy"), reps)}
    for path in bf16.c_paths():
        t[path] = _best(lambda path=path: bf16.gram(x, path=path, nthreads=args.threads), reps)
    if torch is not None:
        xt = torch.from_numpy(x)

        def tg() -> object:
            xb = xt.to(torch.bfloat16)
            return xb.T @ xb

        t["torch bf16"] = _best(tg, reps)
    return t


class _RawLib:
    """The x86/bf16.c entry points of one shared object, called directly (the reference build in --calib)."""

    def __init__(self, path: str) -> None:
        self.lib = ctypes.CDLL(path)
        bf16._declare(self.lib)  # same signatures as the module's own library
        if not self.lib.qk_bf16_engines():
            raise SystemExit(f"{path}: no bf16 engine can run here")

    def pack(self, w: np.ndarray) -> np.ndarray:
        n, k = w.shape
        packed = np.zeros(self.lib.qk_bf16_packed_bytes(n, k) // 2, np.uint16)  # (tiles * 512,)
        self.lib.qk_bf16_pack_weight(bf16._ptr(w), n, k, bf16._ptr(packed))
        return packed

    def linear(self, x: np.ndarray, packed: np.ndarray, n: int, out: np.ndarray | None = None) -> np.ndarray:
        y = bf16._empty64((x.shape[0], n)) if out is None else out  # (m, n)
        assert self.lib.qk_bf16_linear(bf16._ptr(x), x.shape[0], x.shape[1], bf16._ptr(packed), n,
                                       bf16._ptr(y), 1) == 0
        return y

    def gram(self, x: np.ndarray) -> np.ndarray:
        out = bf16._empty64((x.shape[1], x.shape[1]))  # (k, k), aligned as bf16.gram allocates it
        assert self.lib.qk_bf16_gram(bf16._ptr(x), x.shape[0], x.shape[1], bf16._ptr(out), 1, 0) == 0
        return out


def _round(fns: list[Callable[[], object]], calls: int) -> float:
    """Wall seconds for every fn to run `calls` times, each fn on its own thread, all started together."""
    start = threading.Barrier(len(fns) + 1)

    def work(fn: Callable[[], object]) -> None:
        start.wait()
        for _ in range(calls):
            fn()

    ths = [threading.Thread(target=work, args=(fn,)) for fn in fns]
    for t in ths:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in ths:
        t.join()
    return time.perf_counter() - t0


def calib(args: argparse.Namespace) -> None:
    """Two threads, nthreads=1 each, 4096 tokens per call: the calibration forward's products."""
    if not bf16.c_paths():
        raise SystemExit(f"no C bf16 path can run here: {bf16.unavailable_reason('avx512bf16')}")
    path = bf16.c_paths()[0]
    ref = _RawLib(args.ref_lib) if args.ref_lib else None
    m, workers = 4096, 2
    rng = np.random.default_rng(0)
    print(f"calibration scenario ({path}): {workers} threads x nthreads=1, {m} tokens per call, {args.calls} calls per "
          f"thread per round, {args.repeats} rounds each; load average {_load()}")
    print(f"{'product':<24}" + "".join(f"{c + ' s':>10}{'GF/s':>8}" for c in ("new", "ref"))
          + f"{'best':>9}{'paired':>9}")
    cases: list[tuple[str, int, int]] = [("linear", 576, 960), ("linear", 576, 576), ("linear", 576, 3072),
                                         ("linear", 1536, 576), ("gram", 576, 576), ("gram", 1536, 1536)]
    for kind, k, n in cases:
        xs = [rng.standard_normal((m, k), dtype=np.float32) for _ in range(workers)]  # each (m, k)
        fns: dict[str, list[Callable[[], object]]] = {}
        if kind == "linear":
            w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)  # (n, k)
            pw = bf16.pack_weight(w, path=path)
            outs = [bf16._empty64((m, n)) for _ in xs]  # (m, n) per worker, reused and aligned like run_layer's
            pairs = list(zip(xs, outs, strict=True))
            fns["new"] = [lambda x=x, o=o, pw=pw: bf16.linear(x, pw, out=o, nthreads=1) for x, o in pairs]
            if ref is not None:
                pr = ref.pack(w)
                fns["ref"] = [lambda x=x, o=o, pr=pr, n=n: ref.linear(x, pr, n, o) for x, o in pairs]
            name, flop = f"linear {k}->{n}", 2.0 * m * k * n
        else:
            fns["new"] = [lambda x=x: bf16.gram(x, path=path, nthreads=1) for x in xs]
            if ref is not None:
                fns["ref"] = [lambda x=x: ref.gram(x) for x in xs]
            name, flop = f"gram k={k}", 2.0 * m * k * k
        times: dict[str, list[float]] = {key: [] for key in fns}
        for key in fns:
            _round(fns[key], 1)  # warm-up: arenas, page faults
        for _ in range(args.repeats):
            for key in fns:  # alternating rounds: both builds see the same load
                times[key].append(_round(fns[key], args.calls))
        work = flop * workers * args.calls
        line = f"{name:<24}"
        for key in ("new", "ref"):
            line += f"{min(times[key]):>10.3f}{work / min(times[key]) / 1e9:>8.0f}" if key in times else f"{'-':>10}{'-':>8}"
        if "ref" in times:
            paired = np.array(times["ref"]) / np.array(times["new"])  # (repeats,) same-moment ratios
            line += f"{min(times['ref']) / min(times['new']):>9.2f}{float(np.median(paired)):>9.2f}"
        print(line)
    print(f"load average after: {_load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--calib", action="store_true", help="the calibration scenario (see the module docstring)")
    ap.add_argument("--ref-lib", default=None, help="--calib: a reference build of x86/bf16.c to compare against")
    ap.add_argument("--calls", type=int, default=3, help="--calib: calls per thread per round")
    args = ap.parse_args()
    if args.calib:
        calib(args)
        return
    m = args.tokens
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # NumPy's BLAS on the same number of threads as the others
    torch = _torch(args.threads)
    print(f"bf16 calibration products, {m} tokens, {args.threads} threads; load average {_load()}")
    for path in ("amx", "avx512bf16"):
        if not bf16.available(path):
            print(f"{path} path unavailable: {bf16.unavailable_reason(path)}")
    best = (bf16.c_paths() or ("-",))[0]  # the C path calibration runs here, for the ratio columns
    rng = np.random.default_rng(0)
    cols = ["numpy f32", "numpy bf16"] + [c for p in bf16.c_paths() for c in (p, f"{p} out=")] + ["torch bf16"]
    print(f"{'product':<28}" + "".join(f"{c + ' s':>18}{'GF/s':>8}" for c in cols) + f"{'C/f32':>9}{'C/torch':>10}")
    rows: list[tuple[str, float, dict[str, float]]] = []
    for k, n in ((576, 1536), (576, 576), (1536, 576)):
        x = rng.standard_normal((m, k), dtype=np.float32)  # (m, k)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)  # (n, k)
        rows.append((f"x({m},{k})·W({n},{k})ᵀ", 2.0 * m * k * n, _time_linear(x, w, torch, args)))
    for k in (576, 1536):
        x = rng.standard_normal((m, k), dtype=np.float32)  # (m, k)
        rows.append((f"gram x({m},{k})", 2.0 * m * k * k, _time_gram(x, torch, args)))
    for name, flop, t in rows:
        line = f"{name:<28}"
        for c in cols:
            line += f"{t[c]:>18.3f}{flop / t[c] / 1e9:>8.0f}" if c in t else f"{'-':>18}{'-':>8}"
        line += f"{t['numpy f32'] / t[best]:>9.2f}" if best in t else f"{'-':>9}"
        line += f"{t['torch bf16'] / t[best]:>10.2f}" if best in t and "torch bf16" in t else f"{'-':>10}"
        print(line)
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
