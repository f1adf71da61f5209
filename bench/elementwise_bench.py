"""RMSNorm, SiLU·up, RoPE: the NumPy functions (kernels.reference) vs the C kernels, one thread.

    python bench/elementwise_bench.py [--repeats 9]

Shapes: one 4096-token calibration batch of the demo model (8 × 512 tokens; hidden 576, intermediate
1536, 9 heads over 3 kv heads of 64), with the inputs laid out as calibration has them: rms_norm on
(4096, 576), RoPE on q (8, 512, 9, 64) and k (8, 512, 3, 64) viewed from a (4096, 960) qkv product,
silu_mul on the two halves of a (4096, 3072) gate_up product. Times are best of --repeats, wall ms, the
NumPy function and each C variant alternating in one run so they see the same load; the per-batch line
weighs them as a decoder layer calls them (rms_norm 4x counting calibration's Hessian passes, RoPE on
q and k, silu_mul once). NumPy's BLAS is held to one thread. Not a test: the machine is shared, so the
load average is printed before and after; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from qkiln.kernels import elementwise as ew
from qkiln.kernels.reference import apply_rope as np_apply_rope
from qkiln.kernels.reference import rms_norm as np_rms_norm
from qkiln.kernels.reference import silu_mul as np_silu_mul

B, S, HIDDEN, INTER, HEADS, KV_HEADS, D = 8, 512, 576, 1536, 9, 3, 64
ENV_OF = {"portable": "scalar", "avx512": "avx512"}


def _best(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall ms of each, the functions alternating so that all see the same (shared-machine) load."""
    for fn in fns:
        fn()  # warm-up: page faults, library load
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [b * 1e3 for b in best]


def _with_variant(variant: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ["QKILN_KERNEL"] = ENV_OF[variant]
        return fn()

    return run


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    variants = ["portable"] + (["avx512"] if ew.variant_name() == "avx512" else [])
    print(f"load average before: {_load()}   C variants: {', '.join(variants)}")
    rng = np.random.default_rng(0)
    t = B * S
    x = rng.standard_normal((t, HIDDEN), dtype=np.float32)  # (t, hidden)
    w = rng.standard_normal(HIDDEN, dtype=np.float32)  # (hidden,)
    q_out, kv_out = HEADS * D, KV_HEADS * D
    qkv = rng.standard_normal((t, q_out + 2 * kv_out), dtype=np.float32)  # (t, 960)
    q = qkv[:, :q_out].reshape(B, S, HEADS, D)  # (b, s, heads, d) view
    k = qkv[:, q_out:q_out + kv_out].reshape(B, S, KV_HEADS, D)  # (b, s, kv_heads, d) view
    angles = np.arange(S, dtype=np.float32)[:, None] * np.geomspace(1, 1e-4, D // 2, dtype=np.float32)
    cos, sin = np.cos(angles), np.sin(angles)  # (s, d/2)
    gu = (rng.standard_normal((t, 2 * INTER), dtype=np.float32) * 3).astype(np.float32)  # (t, 3072)
    gate, up = gu[:, :INTER], gu[:, INTER:]  # (t, inter) views
    cases = [  # name, calls per batch, NumPy, C
        ("rms_norm (4096, 576)", 4, lambda: np_rms_norm(x, w, 1e-5), lambda: ew.rms_norm(x, w, 1e-5)),
        ("rope q (8, 512, 9, 64)", 1, lambda: np_apply_rope(q, cos, sin), lambda: ew.apply_rope(q, cos, sin)),
        ("rope k (8, 512, 3, 64)", 1, lambda: np_apply_rope(k, cos, sin), lambda: ew.apply_rope(k, cos, sin)),
        ("silu_mul (4096, 1536)", 1, lambda: np_silu_mul(gate, up), lambda: ew.silu_mul(gate, up)),
    ]
    head = f"{'kernel':24} {'numpy ms':>9}" + "".join(f" {v + ' ms':>12} {'ratio':>6}" for v in variants)
    print(head)
    totals = [0.0] * (1 + len(variants))
    saved = os.environ.get("QKILN_KERNEL")
    try:
        with threadpool_limits(1):
            for name, calls, ref, fn in cases:
                ms = _best([ref, *(_with_variant(v, fn) for v in variants)], args.repeats)
                totals = [a + calls * b for a, b in zip(totals, ms, strict=True)]
                print(f"{name:24} {ms[0]:9.2f}" + "".join(f" {c:12.2f} {ms[0] / c:6.1f}" for c in ms[1:]))
    finally:
        if saved is None:
            os.environ.pop("QKILN_KERNEL", None)
        else:
            os.environ["QKILN_KERNEL"] = saved
    print(f"{'per batch (weighted)':24} {totals[0]:9.2f}"
          + "".join(f" {c:12.2f} {totals[0] / c:6.1f}" for c in totals[1:]))
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
