"""Kernel speed on this machine (a benchmark, not a test): INT4 GEMV bandwidth against measured copy
bandwidth, and decode tokens/s of the demo model's Q4_0 GGUF through qkiln's runtime vs llama.cpp.

    python bench/kernel_bench.py gemv [--threads 2] [--seconds 3]
    python bench/kernel_bench.py decode [--gguf Q4_0.gguf] [--tokens 64]   (default: the demo model's Q4_0)
    python bench/kernel_bench.py all --gguf ...          (prints one JSON document)

GEMV: 4096-in x 11008-out matrices (a 7B model's FFN), enough of them to exceed the last-level cache
several times, visited round-robin so every product streams its weights from DRAM. GB/s counts the
weight bytes the kernel reads (activations and outputs are negligible). Both products run on the layout
qkiln's runtime uses on the path in use (printed as weight_type): Q4_0X8 and INT4GX8 (8-row groups repacked
at load) on AVX-512 VNNI, Q4_0X2 on i8mm, the plain layouts elsewhere. `ratio_to_copy_rw` is the goal
figure: GEMV GB/s over the copy bandwidth counted as bytes read + written, measured in alternation with it.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from qkiln.kernels import api
from qkiln.kernels.types import WType, block_bytes


def _llc_bytes() -> int:
    """This machine's last-level cache (sysfs, else sysconf), at least 32 MiB so an unknown value still streams."""
    try:
        text = open("/sys/devices/system/cpu/cpu0/cache/index3/size").read().strip().upper()
        size = int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0)
    except (OSError, ValueError, IndexError):
        try:
            size = int(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError):
            size = 0
    return max(32 << 20, size)


L3_BYTES = _llc_bytes()


def _random_q4_0(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    w = rng.integers(0, 256, block_bytes(WType.Q4_0, n, k), dtype=np.uint8)
    w.reshape(-1, 18)[:, :2] = np.array([0.01], np.float16).view(np.uint8).reshape(1, 2)  # valid scale bytes
    return w


def gemv_bandwidth(n: int = 11008, k: int = 4096, threads: int | None = None, seconds: float = 3.0,
                   cache_multiple: float = 4.0, wtype: str = "q4_0") -> dict:
    """Stream INT4 weights through GEMV; returns GB/s and the ratio to the copy bandwidth measured now."""
    rng = np.random.default_rng(0)
    per = block_bytes(WType.Q4_0, n, k) if wtype == "q4_0" else n * k // 2 + n * (k // 128) * 5
    count = max(2, int(np.ceil(cache_multiple * L3_BYTES / per)))
    x = rng.standard_normal((1, k)).astype(np.float32)
    act = api.quantize_activations_q8(x)
    if wtype == "q4_0":
        # the layout the runtime runs on this path (Q4_0X8 on AVX-512, Q4_0X2 on i8mm): same bytes per weight
        mats = [api.repacked(WType.Q4_0, _random_q4_0(n, k, rng), n, k) for _ in range(count)]

        def product(i: int) -> None:
            api.gemm(mats[i][0], mats[i][1], n, k, act, threads)
    else:
        # the layout the runtime uses for INT4 on this path: api.Int4GLinear (what kernels.linear plugs for an
        # int4_g128 QuantizedTensor) repacks to INT4GX8 on avx512
        lins = [api.Int4GLinear(rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                                rng.uniform(0.001, 0.01, (n, k // 128)).astype(np.float32),
                                rng.integers(0, 16, (n, k // 128), dtype=np.uint8), 128, n, k, threads)
                for _ in range(count)]
        per = lins[0].nbytes

        def product(i: int) -> None:
            lins[i](act)
    for i in range(count):  # warm: page in, start the pool
        product(i)
    # Copy and GEMV passes alternate for `seconds`, so both see the same machine (it may be shared); the best
    # of each is kept: a GEMV pass streams every matrix once, a copy pass moves 256 MiB.
    bw = api.copy_bandwidth(nthreads=threads, repeats=1)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for i in range(count):
            product(i)
        dt = time.perf_counter() - t0
        best = max(best, count * per / dt / 1e9)
        now = api.copy_bandwidth(nthreads=threads, repeats=1)
        bw = {key: max(v, now[key]) for key, v in bw.items()}
    return {
        "kernel_path": api.kernel_path(), "weight_type": (mats[0][0] if wtype == "q4_0" else lins[0].wtype).name,
        "layout": "the layout qkiln's runtime runs on this path (load-time repack where the path has one)",
        "shape": [n, k], "matrices": count, "bytes_per_matrix": per, "llc_bytes": L3_BYTES,
        "threads": threads or api.default_threads(),
        "gemv_gbs": round(best, 2), **{key: round(v, 2) for key, v in bw.items()},
        # the goal: >= 0.8 of the copy bandwidth counted as bytes read + written (STREAM's convention)
        "ratio_to_copy_rw": round(best / bw["copy_rw_gbs"], 3),
        "ratio_to_copy": round(best / bw["copy_gbs"], 3), "ratio_to_read": round(best / bw["read_gbs"], 3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["gemv", "decode", "all"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2, help="decode: alternate qkiln and llama.cpp this many times")
    args = ap.parse_args(argv)
    out: dict = {"load_average_before": os.getloadavg()}  # the machine may be shared: say how busy it was
    if args.what in ("gemv", "all"):
        out["gemv_q4_0"] = gemv_bandwidth(threads=args.threads, seconds=args.seconds)
        out["gemv_int4_g128"] = gemv_bandwidth(threads=args.threads, seconds=args.seconds, wtype="int4g")
    if args.what in ("decode", "all"):
        from qkiln.validate.decode_compare import compare_decode, demo_q4_0_gguf

        out["decode"] = compare_decode(args.gguf or demo_q4_0_gguf(), tokens=args.tokens, threads=args.threads,
                                       rounds=args.rounds)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
