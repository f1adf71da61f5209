"""Prefill causal attention: kernels.reference's NumPy function vs the fused C kernel, 1 and 2 threads.

    python bench/attention_bench.py [--repeats 7] [--bf16-only]

Shapes: calibration's batch of the demo model (b=8, s=t=512, 9 heads over 3 kv heads, head_dim 64) and a
long single sequence of a 7B-class GQA model (b=1, s=t=2048, 32 heads over 8, head_dim 128), and a decode
step of the demo model (s=1 against 512 positions; the kernel runs calls this small on one thread). NumPy's BLAS
threads are set with threadpoolctl to the same count as the kernel's. Times are best of --repeats, wall
milliseconds, NumPy and C alternating in one run; GFLOPS count the causal work, 4·b·heads·d·Σ_i(keys seen by query i).
The agreement column is max|C - NumPy| / max|v|. Not a test: the machine is shared, so the load average is
printed before and after; compare ratios within one run.

A decode table times qk_decode_attention (`single_query=True`, the C decode step's attention: a head per task
on the cache in place) against the units on the same single-query calls (demo model and a Llama-3-8B layer, 192
to 4096 cached positions, 1 and 2 threads); its GB/s is the keys and values read (2·b·kv_heads·t·d·4 bytes) per
second, its agreement column max|decode - units| / max|v|.

Where a bf16 variant runs (amx_bf16 on AMX, else avx512_bf16 on AVX512_BF16), a second table compares it
(precision="bfloat16", calibration's) with the float32 AVX-512 one, single-threaded as calibration calls it,
alternating in one run; its agreement column is max|bf16 - float32| / max|v| (kernels.attention.BF16_ATOL_REL).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from threadpoolctl import threadpool_limits

from qkiln.kernels import attention
from qkiln.kernels.reference import causal_attention as numpy_attention

# (b, s, t, heads, kv_heads, d); the last is a decode step of the demo model with 511 cached positions
SHAPES = ((8, 512, 512, 9, 3, 64), (1, 2048, 2048, 32, 8, 128), (1, 1, 512, 9, 3, 64))


def _best_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best wall ms of each, the two alternating so that both see the same (shared-machine) load."""
    fn_a(), fn_b()  # warm-up: page faults, library load
    best_a = best_b = float("inf")
    for _ in range(repeats):
        for i, fn in enumerate((fn_a, fn_b)):
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best_a, best_b = (min(best_a, dt), best_b) if i == 0 else (best_a, min(best_b, dt))
    return best_a * 1e3, best_b * 1e3


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--bf16-only", action="store_true", help="only the bf16 vs float32 AVX-512 table")
    args = ap.parse_args()
    print(f"load average before: {_load()}   C variant: {attention.variant_name()}")
    if not args.bf16_only:
        _float32_table(args.repeats)
        _decode_table(args.repeats)
    fast = attention.bf16_variant()
    if fast is not None:
        _bf16_table(fast, args.repeats)
    else:
        print("bf16 variants: unavailable here")
    print(f"load average after: {_load()}")


def _inputs(rng: np.random.Generator, b: int, s: int, t: int, heads: int, kvh: int, d: int):
    q = rng.standard_normal((b, s, heads, d), dtype=np.float32)  # (b, s, heads, d)
    k = rng.standard_normal((b, kvh, t, d), dtype=np.float32)  # (b, kvh, t, d)
    v = rng.standard_normal((b, kvh, t, d), dtype=np.float32)  # (b, kvh, t, d)
    return q, k, v


def _bf16_table(variant: str, repeats: int) -> None:
    print(f"\nbf16 variant: {variant}")
    print(f"{'shape (b, s, t, heads, kv, d)':32} {'thr':>3} {'f32 ms':>8} {'bf16 ms':>8} {'ratio':>6} "
          f"{'f32 GF':>7} {'bf16 GF':>7} {'max|Δ|/max|v|':>13}")
    rng = np.random.default_rng(0)
    for b, s, t, heads, kvh, d in SHAPES[:2]:
        q, k, v = _inputs(rng, b, s, t, heads, kvh, d)
        out = np.empty((b * s, heads * d), np.float32)  # (b * s, heads * d), reused as calibration does
        flops = 4.0 * b * heads * d * (s * (t - s) + s * (s + 1) / 2)
        ref = attention.causal_attention_c(q, k, v, threads=1, variant="avx512")
        err = float(np.abs(attention.causal_attention_c(q, k, v, threads=1, variant=variant) - ref).max())
        t_f, t_a = _best_pair(lambda: attention.causal_attention_c(q, k, v, threads=1, variant="avx512", out=out),  # noqa: B023
                              lambda: attention.causal_attention(q, k, v, threads=1, out=out,  # noqa: B023
                                                                 precision="bfloat16"),
                              repeats)
        print(f"{(b, s, t, heads, kvh, d)!s:32} {1:>3} {t_f:8.2f} {t_a:8.2f} {t_f / t_a:6.2f} "
              f"{flops / t_f / 1e6:7.1f} {flops / t_a / 1e6:7.1f} {err / float(np.abs(v).max()):13.2e}", flush=True)


def _float32_table(repeats: int) -> None:
    print(f"{'shape (b, s, t, heads, kv, d)':32} {'thr':>3} {'numpy ms':>9} {'C ms':>8} {'ratio':>6} "
          f"{'C GFLOPS':>8} {'max|Δ|/max|v|':>13}")
    rng = np.random.default_rng(0)
    for b, s, t, heads, kvh, d in SHAPES:
        q, k, v = _inputs(rng, b, s, t, heads, kvh, d)
        flops = 4.0 * b * heads * d * (s * (t - s) + s * (s + 1) / 2)
        err = float(np.abs(attention.causal_attention_c(q, k, v, threads=1) - numpy_attention(q, k, v)).max())
        for threads in (1, 2):
            with threadpool_limits(limits=threads, user_api="blas"):
                t_np, t_c = _best_pair(lambda: numpy_attention(q, k, v),  # noqa: B023
                                       lambda: attention.causal_attention_c(q, k, v, threads=threads),  # noqa: B023
                                       repeats)
            print(f"{(b, s, t, heads, kvh, d)!s:32} {threads:>3} {t_np:9.2f} {t_c:8.2f} {t_np / t_c:6.2f} "
                  f"{flops / t_c / 1e6:8.1f} {err / float(np.abs(v).max()):13.2e}", flush=True)


# (b, t, heads, kv_heads, d): the demo model's decode after a 192-, 1024- and 4096-token context, a Llama-3-8B
# layer's after 1024 and 4096
DECODE_SHAPES = ((1, 192, 9, 3, 64), (1, 1024, 9, 3, 64), (1, 4096, 9, 3, 64), (1, 1024, 32, 8, 128),
                 (1, 4096, 32, 8, 128))


def _decode_table(repeats: int) -> None:
    print(f"\n{'decode (b, t, heads, kv, d)':32} {'thr':>3} {'units ms':>9} {'decode ms':>9} {'ratio':>6} "
          f"{'GB/s':>6} {'max|Δ|/max|v|':>13}")
    rng = np.random.default_rng(0)
    for b, t, heads, kvh, d in DECODE_SHAPES:
        q, k, v = _inputs(rng, b, 1, t, heads, kvh, d)
        err = float(np.abs(attention.causal_attention_c(q, k, v, threads=1, single_query=True)
                           - attention.causal_attention_c(q, k, v, threads=1)).max())
        for threads in (1, 2):
            t_u, t_d = _best_pair(lambda: attention.causal_attention_c(q, k, v, threads=threads),  # noqa: B023
                                  lambda: attention.causal_attention_c(q, k, v, threads=threads,  # noqa: B023
                                                                       single_query=True),
                                  repeats)
            print(f"{(b, t, heads, kvh, d)!s:32} {threads:>3} {t_u:9.3f} {t_d:9.3f} {t_u / t_d:6.2f} "
                  f"{2 * b * kvh * t * d * 4 / t_d / 1e6:6.1f} {err / float(np.abs(v).max()):13.2e}", flush=True)


if __name__ == "__main__":
    main()
