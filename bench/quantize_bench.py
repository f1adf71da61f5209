"""Benchmark (not a timed test): GPTQ INT4 g64 asymmetric of the demo model, 128 samples x 512 tokens.

    python bench/quantize_bench.py [--samples 128] [--seq-len 512] [--algo gptq] [--scheme int4_g64_asym]

Calibration text: GPL-3 + LGPL-2.1 + GFDL-1.3 from /usr/share/common-licenses. Those three hold about
18.7k tokens of the demo tokenizer — 36 windows of 512 — so the text is repeated end to end until it
holds 128 windows: the work (and the memory) is that of 128 x 512 distinct tokens, the statistics those
of 36 distinct windows. The goals: under 60 s and under 2 GB peak RSS. Prints both, the process's CPU
seconds, and what the machine did meanwhile: its load average and, from /proc/stat, the CPU seconds the
hypervisor gave to other guests ("steal": on a shared host they stretch the wall time) and the CPU seconds
left idle (the serial parts: GPTQ of an input group waits for all of its Hessian). Steal does not show
everything: with no steal at all, the speed of the same instructions moves up to 6x within minutes (the cores'
other hyperthreads and clocks belong to the host), most of all on the AMX tiles. So the benchmark also
measures, just before and just after the run, fixed single-threaded probes — the bf16 product on each C path
(AMX, AVX512_BF16) and float32 SGEMM, each on operands that stay in L2 — and prints their GFLOP/s: a run's wall time is only
comparable to another's taken at similar probe speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

LICENSES = Path("/usr/share/common-licenses")
CALIB = ("GPL-3", "LGPL-2.1", "GFDL-1.3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--algo", default="gptq")
    ap.add_argument("--scheme", default="int4_g64_asym")
    ap.add_argument("--batch-samples", type=int, default=8)
    ap.add_argument("--calib-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--max-layers", type=int, default=None,
                    help="stop after this many decoder layers and extrapolate the wall time (every layer costs the same)")
    args = ap.parse_args()

    from qkiln.demo import demo_model_dir
    from qkiln.formats.hf import Checkpoint
    from qkiln.quantize.calibrate import QuantizeReport, calibration_ids, peak_rss_bytes, quantize_model
    from qkiln.quantize.registry import get_scheme

    ck = Checkpoint.open(demo_model_dir())
    text = "".join((LICENSES / n).read_text(encoding="utf-8") for n in CALIB)
    tokens = np.asarray(ck.tokenizer().encode(text, add_special_tokens=False).ids, dtype=np.int64)
    need = args.samples * args.seq_len
    reps = -(-need // len(tokens))
    ids = calibration_ids(np.tile(tokens, reps), args.samples, args.seq_len)
    probe_before = _speed_probes()
    rss_before = peak_rss_bytes()
    host0 = _host_cpu_seconds()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    report = QuantizeReport(algo=args.algo)
    t0 = time.perf_counter()
    n_quantized = 0
    n_layers = ck.config.num_hidden_layers
    for name, _value in quantize_model(ck, get_scheme(args.scheme), args.algo, ids, report=report,
                                       batch_samples=args.batch_samples, calib_dtype=args.calib_dtype):
        n_quantized += 1  # the consumer keeps nothing: this measures the quantizer's own footprint
        if args.max_layers and name == f"model.layers.{args.max_layers - 1}.post_attention_layernorm.weight":
            break
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    host1 = _host_cpu_seconds()
    probe_after = _speed_probes()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)  # seconds, all threads
    report.peak_rss_bytes = peak_rss_bytes()
    done = len(report.layer_seconds)
    extrapolated = None
    cpu_all = cpu
    if done < n_layers:  # embedding RTN + measured layers + the rest at the measured mean
        extrapolated = wall + (n_layers - done) * float(np.mean(report.layer_seconds))
        cpu_all = cpu * n_layers / done  # CPU seconds are what a busy machine does not inflate
    doc = {
        "algo": args.algo, "scheme": args.scheme, "calib_dtype": args.calib_dtype, "samples": int(ids.shape[0]), "seq_len": args.seq_len,
        "distinct_calibration_tokens": len(tokens), "text_repeats": reps,
        "wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "layers_run": done,
        "wall_seconds_extrapolated_to_all_layers": round(extrapolated, 1) if extrapolated else None,
        "cpu_seconds_all_layers": round(cpu_all, 1), "peak_rss_mb": round(report.peak_rss_bytes / 2**20),
        "rss_before_mb": round(rss_before / 2**20), "tensors": n_quantized,
        "layer_seconds_mean": round(float(np.mean(report.layer_seconds)), 2),
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "host_steal_cpu_seconds": round(host1["steal"] - host0["steal"], 1) if host0 and host1 else None,
        "idle_cpu_seconds": round(host1["idle"] - host0["idle"], 1) if host0 and host1 else None,
        "probe_gflops_before": probe_before, "probe_gflops_after": probe_after,
        "goals": {"wall_seconds": 60, "peak_rss_mb": 2000},
    }
    print(json.dumps(doc, indent=2))
    total = extrapolated or wall
    note = f" (extrapolated from {done} layers)" if extrapolated else ""
    print(f"wall time {total:.1f} s{note}, "
          f"peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB; probes before/after: AMX bf16 "
          f"{probe_before['amx_bf16']}/{probe_after['amx_bf16']}, AVX512_BF16 "
          f"{probe_before['avx512bf16_bf16']}/{probe_after['avx512bf16_bf16']} GFLOP/s, SGEMM "
          f"{probe_before['sgemm_f32']}/{probe_after['sgemm_f32']} GFLOP/s")


def _speed_probes(repeats: int = 100) -> dict[str, float | None]:
    """GFLOP/s of fixed single-threaded products, the median of `repeats` calls: the bf16 linear on each C
    path here (512 bf16 tokens by a 576 x 576 weight, the shape of calibration's products) and NumPy's float32 SGEMM
    (what GPTQ's updates and factorization run on), operands ~1 MB (L2): what a core delivers at the moment."""
    from qkiln.kernels import bf16
    from qkiln.kernels.blas import one_blas_thread

    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 576), dtype=np.float32)  # (tokens, in)
    w = rng.standard_normal((576, 576), dtype=np.float32)  # (out, in)
    flop = 2.0 * 512 * 576 * 576

    def rate(fn: Callable[[], object]) -> float:
        fn()
        return round(flop / float(np.median([_timed(fn) for _ in range(repeats)])) / 1e9, 1)

    out: dict[str, float | None] = {"amx_bf16": None, "avx512bf16_bf16": None, "sgemm_f32": None}
    for path in bf16.c_paths():
        xb, packed, y = x.astype(bf16.BF16), bf16.pack_weight(w, path=path), bf16.aligned_empty((512, 576))
        out[f"{path}_bf16"] = rate(lambda xb=xb, packed=packed, y=y: bf16.linear(xb, packed, out=y, nthreads=1))
    with one_blas_thread():
        out["sgemm_f32"] = rate(lambda: x @ w.T)
    return out


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _host_cpu_seconds() -> dict[str, float] | None:
    """The machine's idle and steal CPU seconds so far, summed over CPUs (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return {"idle": int(fields[4]) / tick, "steal": int(fields[8]) / tick}


if __name__ == "__main__":
    main()
