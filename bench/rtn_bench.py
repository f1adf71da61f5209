"""RTN speed per scheme on a Llama-7B-sized MLP matrix (4096 x 11008, random normal, no download).

    python bench/rtn_bench.py [--rows 4096] [--cols 11008] [--schemes q4_0,q4_k,...] [--workers N]

Prints wall and process CPU seconds per scheme (best of --repeats) and the weights/s. Not a test: wall
time on a shared machine is noisy, CPU time less so.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn

DEFAULT = "q4_0,q8_0,q4_1,q5_0,int4_g128,int4_g64_asym,int8,fp8_e4m3fn_pc,q4_k,q5_k,q6_k"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--schemes", default=DEFAULT)
    ap.add_argument("--workers", type=int, default=None, help="threads (default: CPU count, at most 4)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    w = np.random.default_rng(0).standard_normal((args.rows, args.cols)).astype(np.float32)  # (rows, cols)
    print(f"RTN of a {args.rows}x{args.cols} float32 matrix ({w.size / 1e6:.1f} M weights)")
    print(f"{'scheme':<16}{'wall s':>9}{'cpu s':>9}{'M weights/s':>13}")
    for name in args.schemes.split(","):
        scheme = get_scheme(name)
        if scheme.fit_cols and args.cols % scheme.fit_cols:
            print(f"{name:<16} skipped: {args.cols} columns do not fit blocks of {scheme.fit_cols}")
            continue
        best = (float("inf"), float("inf"))
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            quantize_rtn(w, scheme, workers=args.workers)
            best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
        print(f"{name:<16}{best[0]:>9.2f}{best[1]:>9.2f}{w.size / best[0] / 1e6:>13.1f}")


if __name__ == "__main__":
    main()
