"""Speed of the calibration products: NumPy float32, the NumPy bf16 path, the AMX bf16 path, torch bf16.

    python bench/bf16_bench.py [--tokens 65536] [--repeats 3] [--threads N]

Shapes are the demo model's (hidden 576, intermediate 1536) at GPTQ's 128 x 512 calibration tokens:
x (T, 576)·W(1536, 576)ᵀ, x (T, 576)·W(576, 576)ᵀ, x (T, 1536)·W(576, 1536)ᵀ, and the Gram xᵀx of
(T, 576) and (T, 1536). Every method is timed in the same run (best of --repeats, wall seconds), the weight
prepared beforehand (packed/rounded/converted) and x converted inside the timing, as calibration does;
"amx out=" writes into one reused output array (no page zeroing of a fresh output per call).
GFLOPS count 2·m·k·n for a product and 2·m·k² for a Gram (the work of the full product, though the AMX
Gram computes only the upper triangle). Not a test: the machine is shared, so the load average is printed
before and after; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
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


def _time_linear(x: np.ndarray, w: np.ndarray, amx: bool, torch: Any, args: argparse.Namespace) -> dict[str, float]:
    reps = args.repeats
    t = {"numpy f32": _best(lambda: x @ w.T, reps)}
    wn = bf16.pack_weight(w, path="numpy")
    t["numpy bf16"] = _best(lambda: bf16.linear(x, wn), reps)
    if amx:
        wa = bf16.pack_weight(w, path="amx")
        t["amx bf16"] = _best(lambda: bf16.linear(x, wa, nthreads=args.threads), reps)
        out = np.empty((x.shape[0], w.shape[0]), np.float32)  # (m, n), reused: no page zeroing per call
        t["amx out="] = _best(lambda: bf16.linear(x, wa, out=out, nthreads=args.threads), reps)
    if torch is not None:
        xt, wt = torch.from_numpy(x), torch.from_numpy(w).to(torch.bfloat16)
        t["torch bf16"] = _best(lambda: torch.nn.functional.linear(xt.to(torch.bfloat16), wt), reps)
    return t


def _time_gram(x: np.ndarray, amx: bool, torch: Any, args: argparse.Namespace) -> dict[str, float]:
    reps = args.repeats
    t = {"numpy f32": _best(lambda: x.T @ x, reps), "numpy bf16": _best(lambda: bf16.gram(x, path="numpy"), reps)}
    if amx:
        t["amx bf16"] = _best(lambda: bf16.gram(x, path="amx", nthreads=args.threads), reps)
    if torch is not None:
        xt = torch.from_numpy(x)

        def tg() -> object:
            xb = xt.to(torch.bfloat16)
            return xb.T @ xb

        t["torch bf16"] = _best(tg, reps)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    m = args.tokens
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)  # NumPy's BLAS on the same number of threads as the others
    torch = _torch(args.threads)
    amx = bf16.amx_available()
    print(f"bf16 calibration products, {m} tokens, {args.threads} threads; load average {_load()}")
    if not amx:
        print(f"AMX path unavailable: {bf16.amx_unavailable_reason()}")
    rng = np.random.default_rng(0)
    cols = ["numpy f32", "numpy bf16", "amx bf16", "amx out=", "torch bf16"]
    print(f"{'product':<28}" + "".join(f"{c + ' s':>14}{'GF/s':>8}" for c in cols) + f"{'amx/f32':>9}{'amx/torch':>10}")
    rows: list[tuple[str, float, dict[str, float]]] = []
    for k, n in ((576, 1536), (576, 576), (1536, 576)):
        x = rng.standard_normal((m, k), dtype=np.float32)  # (m, k)
        w = rng.standard_normal((n, k), dtype=np.float32) * np.float32(0.05)  # (n, k)
        rows.append((f"x({m},{k})·W({n},{k})ᵀ", 2.0 * m * k * n, _time_linear(x, w, amx, torch, args)))
    for k in (576, 1536):
        x = rng.standard_normal((m, k), dtype=np.float32)  # (m, k)
        rows.append((f"gram x({m},{k})", 2.0 * m * k * k, _time_gram(x, amx, torch, args)))
    for name, flop, t in rows:
        line = f"{name:<28}"
        for c in cols:
            line += f"{t[c]:>14.3f}{flop / t[c] / 1e9:>8.0f}" if c in t else f"{'-':>14}{'-':>8}"
        line += f"{t['numpy f32'] / t['amx bf16']:>9.2f}" if "amx bf16" in t else f"{'-':>9}"
        line += f"{t['torch bf16'] / t['amx bf16']:>10.2f}" if "amx bf16" in t and "torch bf16" in t else f"{'-':>10}"
        print(line)
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
