"""The least time GPTQ calibration's products can take on this CPU, and the speed-up over a reference it allows.

    python bench/calibration_floor.py [--samples 128] [--seq-len 512] [--ref-seconds S] [--threads N]

GPTQ's layer-by-layer calibration (`quantize.sequential`) makes, per calibration token and decoder layer, one
forward through the seven linears (2·params multiply-adds counted as FLOPs) and the Hessian sums of the four
input groups (q/k/v, o, gate/up, down: the upper triangle, k(k+1) FLOPs for a k-wide input). qkiln runs both in
bfloat16 with float32 sums: on a CPU without AMX nothing does them faster than the vector unit's bfloat16 dot
product (AVX512_BF16 `vdpbf16ps`: 64 FLOPs per instruction), and on a CPU without AVX512_BF16 either (AVX2
machines: AMD Zen 2/3, older Intel) than its float32 multiply-add (`vfmadd231ps` on 8 lanes: 16 FLOPs; a
product of two bfloat16 values is exact in float32, so that is the same arithmetic). This bench

1. counts those FLOPs for the demo model's shapes (or --config) at --samples x --seq-len tokens;
2. measures the best of those instructions this CPU has at its peak: a C loop of 12 independent chains of it
   (no memory traffic), compiled with the kernels' compiler, on --threads threads at once (default: every
   core), the best of 8 windows of --seconds/8;
3. measures qkiln's own products at calibration's shapes (`qkiln.kernels.bf16`, on its default path: one
   thread per caller on the C paths; the NumPy path's BLAS limited to one thread per caller);

and prints the floor: the products alone at the instruction's peak, with nothing else (attention, norms,
the GPTQ solves, I/O) — a lower bound on any conversion doing this work with these products here. With
--ref-seconds (a reference tool's wall time for the same work, e.g. llm-compressor's in
bench/gpu_formats_bench.py), the largest speed-up over it the floor allows.

4. Beside it, the one route past that floor: products on 8-bit activations (a numerics change qkiln does not
   make; GPTQ's Hessians are defined on the float forward). The best int8 dot product this CPU has
   (AVX512-VNNI or AVX-VNNI `vpdpbusd`, else AVX2's vpmaddubsw + vpmaddwd + vpaddd) is probed the same way, and
   the bound printed for the forward in int8 and for both products in int8.
Not a test: timings on a shared machine vary; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from llamacpp_ref import cpu_flags

from qkiln.kernels import bf16
from qkiln.kernels.blas import one_blas_thread
from qkiln.kernels.build import find_cc
from qkiln.model.config import LlamaConfig

PEAK_C = r"""
#include <immintrin.h>
#include <pthread.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

/* The instruction: -DQK_DPBF16 vdpbf16ps (zmm); -DQK_VNNI512 vpdpbusd (zmm); -DQK_AVXVNNI vpdpbusd (ymm);
 * -DQK_MADDUBS AVX2's int8 dot product without VNNI, one step of three instructions (vpmaddubsw: u8 x s8 pairs
 * into int16; vpmaddwd by ones: pairs into int32; vpaddd); else vfmadd231ps (ymm). */
#if defined(QK_DPBF16)
typedef __m512 acc_t;
typedef __m512bh opd_t;
#define ZERO() _mm512_setzero_ps()
#define OPERAND(i) (__m512bh)_mm512_set1_epi16(0x3c00 + (i))
#define OP(a, x, y) _mm512_dpbf16_ps(a, x, y)
#elif defined(QK_VNNI512)
typedef __m512i acc_t;
typedef __m512i opd_t;
#define ZERO() _mm512_setzero_si512()
#define OPERAND(i) _mm512_set1_epi8(1 + (i))
#define OP(a, x, y) _mm512_dpbusd_epi32(a, x, y)
#elif defined(QK_AVXVNNI)
typedef __m256i acc_t;
typedef __m256i opd_t;
#define ZERO() _mm256_setzero_si256()
#define OPERAND(i) _mm256_set1_epi8(1 + (i))
#define OP(a, x, y) _mm256_dpbusd_avx_epi32(a, x, y)
#elif defined(QK_MADDUBS)
typedef __m256i acc_t;
typedef __m256i opd_t;
#define ZERO() _mm256_setzero_si256()
#define OPERAND(i) _mm256_set1_epi8(1 + (i))
#define OP(a, x, y) _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1)))
#else
typedef __m256 acc_t;
typedef __m256 opd_t;
#define ZERO() _mm256_setzero_ps()
#define OPERAND(i) _mm256_set1_ps(1.0f + (i) / 64.0f)
#define OP(a, x, y) _mm256_fmadd_ps(x, y, a)
#endif

/* 12 independent accumulator chains, each with its own operand (so none can be merged), for `seconds`:
 * returns steps (OPs) per second. */
static double run(double seconds) {
    acc_t a0 = ZERO(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0,
          a11 = a0;
    opd_t x = OPERAND(0);
#define Y(i) opd_t y##i = OPERAND(16 + i)
    Y(0); Y(1); Y(2); Y(3); Y(4); Y(5); Y(6); Y(7); Y(8); Y(9); Y(10); Y(11);
    long n = 0;
    const double t0 = now();
    double t = t0;
    while (t - t0 < seconds) {
        for (int i = 0; i < 100000; i++) {
            a0 = OP(a0, x, y0); a1 = OP(a1, x, y1); a2 = OP(a2, x, y2); a3 = OP(a3, x, y3); a4 = OP(a4, x, y4);
            a5 = OP(a5, x, y5); a6 = OP(a6, x, y6); a7 = OP(a7, x, y7); a8 = OP(a8, x, y8); a9 = OP(a9, x, y9);
            a10 = OP(a10, x, y10); a11 = OP(a11, x, y11);
            __asm__ volatile("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(a4), "+v"(a5), "+v"(a6), "+v"(a7),
                             "+v"(a8), "+v"(a9), "+v"(a10), "+v"(a11), "+v"(x));
        }
        n += 12 * 100000L;
        t = now();
    }
    return n / (t - t0);
}

typedef struct { double seconds, rate; } job_t;
static void *worker(void *p) { job_t *j = p; j->rate = run(j->seconds); return 0; }

/* Instructions per second of each of `threads` threads running at once, summed. */
double qk_peak(int threads, double seconds) {
    pthread_t th[64];
    job_t jobs[64];
    if (threads > 64) threads = 64;
    for (int i = 0; i < threads; i++) {
        jobs[i].seconds = seconds;
        pthread_create(&th[i], 0, worker, &jobs[i]);
    }
    double total = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], 0);
        total += jobs[i].rate;
    }
    return total;
}
"""


def calibration_flops(cfg: LlamaConfig, tokens: int) -> dict[str, float]:
    """FLOPs of one GPTQ calibration over `tokens` tokens: the linears' forward and the Hessians' upper triangles."""
    h, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    params = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
    widths = (h, q, h, inter)  # attn_in, attn_out, mlp_in, mlp_out
    per_layer = tokens * cfg.num_hidden_layers
    return {"forward": 2.0 * params * per_layer, "hessians": float(sum(k * (k + 1) for k in widths)) * per_layer}


# The probe's instructions, best first: (name, compiler flags, FLOPs per instruction).
INSTRUCTIONS = (("vdpbf16ps zmm", ("-DQK_DPBF16", "-mavx512f", "-mavx512bf16"), 64),
                ("vfmadd231ps ymm", ("-mavx2", "-mfma"), 16))


def best_instruction() -> tuple[str, tuple[str, ...], int]:
    """The fastest of INSTRUCTIONS this CPU runs (AVX512_BF16 as the bf16 products' C path sees it)."""
    if bf16.available("avx512bf16"):
        return INSTRUCTIONS[0]
    if {"avx2", "fma"} <= cpu_flags(Path("/proc/cpuinfo").read_text()):
        return INSTRUCTIONS[1]
    raise SystemExit("this CPU has neither AVX512_BF16 nor AVX2 with FMA: no probe for it")


# int8 dot products, best first: (name, compiler flags, integer ops (2 per multiply-add) per step, CPU flags).
# Not what qkiln runs: the bound a calibration on 8-bit activations could reach (printed beside the floor).
INT8_STEPS = (("vpdpbusd zmm", ("-DQK_VNNI512", "-mavx512f", "-mavx512vnni"), 128, {"avx512f", "avx512_vnni"}),
              ("vpdpbusd ymm (AVX-VNNI)", ("-DQK_AVXVNNI", "-mavx2", "-mavxvnni"), 64, {"avx2", "avx_vnni"}),
              ("vpmaddubsw+vpmaddwd+vpaddd ymm", ("-DQK_MADDUBS", "-mavx2"), 64, {"avx2"}))


def best_int8_step() -> tuple[str, tuple[str, ...], int] | None:
    """The fastest of INT8_STEPS this CPU runs, or None."""
    flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    return next(((name, cc, ops) for name, cc, ops, need in INT8_STEPS if need <= flags), None)


def instruction_peak(threads: int, seconds: float, flags: tuple[str, ...], flops_per_instr: int) -> float:
    """FLOP/s (or integer op/s) of the probe's instruction on `threads` threads at once."""
    cc = find_cc()
    if cc is None:
        raise SystemExit("no C compiler found (set CC): the peak probe is compiled here")
    with tempfile.TemporaryDirectory() as d:
        src, lib = Path(d) / "peak.c", Path(d) / "peak.so"
        src.write_text(PEAK_C)
        subprocess.run([cc, "-O2", *flags, "-shared", "-fPIC", "-pthread", str(src), "-o", str(lib)], check=True)
        peak = ctypes.CDLL(str(lib)).qk_peak
        peak.restype, peak.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_double]
        return flops_per_instr * max(peak(threads, seconds / 8) for _ in range(8))  # the best window: the host steals time


def kernel_rate(threads: int, tokens: int = 4096, repeats: int = 5) -> dict[str, float]:
    """FLOP/s of qkiln's bf16 products at calibration's shapes, `threads` callers at once (one thread each, as
    `quantize.sequential` runs them): the demo's gate/up (576 -> 3072) and down (1536 -> 576) and the two
    Gram widths (upper triangle counted)."""
    rng = np.random.default_rng(0)
    shapes = {"linear 576->3072": (576, 3072), "linear 1536->576": (1536, 576)}
    out: dict[str, float] = {}

    def timed(work: Callable[[int], None], flops: float) -> float:
        best = float("inf")
        with one_blas_thread():  # the NumPy path's BLAS: one thread per caller, as calibration runs it
            for _ in range(repeats):
                ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
                t0 = time.perf_counter()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                best = min(best, time.perf_counter() - t0)
        return threads * flops / best

    for name, (k, n) in shapes.items():
        x = rng.standard_normal((tokens, k), dtype=np.float32).astype(bf16.BF16)
        w = bf16.pack_weight(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
        ys = [bf16.aligned_empty((tokens, n)) for _ in range(threads)]  # reused, as calibration's scratch is

        def lin(i: int, x: np.ndarray = x, w: bf16.BF16Weight = w, ys: list[np.ndarray] = ys) -> None:
            bf16.linear(x, w, out=ys[i], nthreads=1)

        out[name] = timed(lin, 2.0 * tokens * k * n)
    for k in (576, 1536):
        x = rng.standard_normal((tokens, k), dtype=np.float32).astype(bf16.BF16)

        def gram(i: int, x: np.ndarray = x, k: int = k) -> None:
            g = bf16.GramSum(k, nthreads=1)
            g.add(x)
            g.result()

        out[f"Gram {k}"] = timed(gram, float(tokens) * k * (k + 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, help="a checkpoint's config.json (default: the demo model's)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seconds", type=float, default=3.0, help="length of the peak probe")
    ap.add_argument("--ref-seconds", type=float, help="a reference tool's wall time for the same calibration")
    args = ap.parse_args()
    instr, flags, per_instr = best_instruction()
    if args.config is None:
        from qkiln.demo import demo_model_dir
        args.config = demo_model_dir() / "config.json"
    cfg = LlamaConfig.from_file(args.config)
    tokens = args.samples * args.seq_len
    flops = calibration_flops(cfg, tokens)
    total = sum(flops.values())
    print(f"load before {os.getloadavg()[0]:.2f}; {args.threads} threads; {args.samples} x {args.seq_len} tokens")
    peak = instruction_peak(args.threads, args.seconds, flags, per_instr)
    rates = kernel_rate(args.threads)
    print(f"products: forward {flops['forward'] / 1e12:.2f} TFLOP + Hessians {flops['hessians'] / 1e12:.2f} = "
          f"{total / 1e12:.2f} TFLOP")
    print(f"{instr} peak, {args.threads} threads: {peak / 1e9:.0f} GFLOP/s ({peak / 1e9 / args.threads:.0f} per thread)")
    for name, r in rates.items():
        print(f"qkiln {name} ({bf16.bf16_path()}): {r / 1e9:.0f} GFLOP/s ({100 * r / peak:.0f} % of peak)")
    floor = total / peak
    print(f"floor (products at peak, nothing else): {floor:.1f} s wall, {floor * args.threads:.1f} CPU-s")
    if args.ref_seconds:
        print(f"largest speed-up over {args.ref_seconds:.1f} s this floor allows: {args.ref_seconds / floor:.2f}x")
    int8 = best_int8_step()
    if int8 is not None:  # the route past the floor: 8-bit activations (a numerics change qkiln does not make)
        name, cc, ops = int8
        ipeak = instruction_peak(args.threads, args.seconds, cc, ops)
        fwd_int8 = flops["forward"] / ipeak + flops["hessians"] / peak
        all_int8 = total / ipeak
        print(f"int8 route (calibration on 8-bit activations): {name} peak {ipeak / 1e9:.0f} G op/s "
              f"({ipeak / peak:.2f}x {instr}); forward in int8, Hessians as above: {fwd_int8:.1f} s; "
              f"both in int8: {all_int8:.1f} s")
        if args.ref_seconds:
            print(f"largest speed-up over {args.ref_seconds:.1f} s the int8 route allows: "
                  f"{args.ref_seconds / fwd_int8:.2f}x (forward), {args.ref_seconds / all_int8:.2f}x (both)")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
