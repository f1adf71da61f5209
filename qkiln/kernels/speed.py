"""Speed of an artifact's real layer shapes on this machine: the library behind `qkiln bench`.

For every 2-D weight of a GGUF file, the product the runtime would run is timed on the file's own bytes
(memory-mapped): decode = one activation row (GEMV) per linear, prompt = `prompt_tokens` rows (GEMM).
Every type is timed as itself: a file holding a weight type without a kernel (float weights: F16, BF16, F32)
is a `NoKernelError`, never timed with a stand-in of another type. Decode time per token is the sum
over all linears including the head — attention, norms and sampling are not counted, so it is an upper bound
on tokens/s that a real runtime approaches as the model grows. Weight GB/s = bytes streamed per token / time per token, next to this machine's copy
bandwidth measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qkiln.errors import GGUFError
from qkiln.kernels import api
from qkiln.kernels.types import BLOCK, WType


class NoKernelError(GGUFError):
    """A GGUF holds weights of a type qkiln has no kernel for, so their speed cannot be measured here."""


@dataclass(frozen=True)
class Linear:
    name: str
    ggml_type: str
    wtype: WType  # the kernel type timed: the file's own
    out_features: int
    in_features: int
    data: np.ndarray  # (bytes,) uint8


def gguf_linears(path: str | Path) -> list[Linear]:
    """Every 2-D weight of a GGUF (the linears and the embedding/head) as a kernel-ready matrix."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/OSError/struct errors on bad files
        raise GGUFError(f"{path}: not a readable GGUF file ({e.__class__.__name__}: {e}); pass a .gguf artifact") from None
    names = {t.name for t in reader.tensors}
    kernels = {int(w) for w in BLOCK}
    out: list[Linear] = []
    missing: dict[str, list[str]] = {}  # ggml type name -> tensors of that type without a kernel
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        k, n = int(t.shape[0]), int(t.shape[1])  # GGUF dims: innermost first
        if t.name == "token_embd.weight" and "output.weight" in names:
            continue  # an untied model's embedding is only a lookup
        tid = int(t.tensor_type)
        if tid not in kernels:
            missing.setdefault(t.tensor_type.name, []).append(t.name)
            continue
        if k % BLOCK[WType(tid)][0]:
            raise GGUFError(f"{path}: tensor {t.name} ({t.tensor_type.name}) has rows of {k} values, not a multiple "
                            f"of its block of {BLOCK[WType(tid)][0]}; the file is malformed")
        out.append(Linear(t.name, t.tensor_type.name, WType(tid), n, k, np.asarray(t.data).view(np.uint8).reshape(-1)))
    if missing:
        which = "; ".join(f"{ty} ({len(ts)} tensor{'s' if len(ts) > 1 else ''}, e.g. {ts[0]})"
                          for ty, ts in sorted(missing.items()))
        have = ", ".join(w.name for w in sorted(BLOCK, key=int))
        raise NoKernelError(f"{path}: qkiln has no kernel for {which}, so its speed cannot be measured (a type is "
                            f"never timed as another); kernels exist for {have}. Convert with a scheme of those "
                            f"types to time it.")
    if not out:
        raise GGUFError(f"{path}: no 2-D weights found; pass a model GGUF")
    return out


def best_time(fn, min_seconds: float, min_runs: int = 2) -> float:
    """Best wall time of fn() over repeated runs lasting at least min_seconds in total."""
    best = float("inf")
    runs = 0
    t_end = time.perf_counter() + min_seconds
    while runs < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best


def bench_linears(linears: list[Linear], *, threads: int | None = None, prompt_tokens: int = 128,
                  seconds: float = 2.0, price_per_hour: float | None = None) -> dict:
    rng = np.random.default_rng(1)
    prepared = []
    for lin in linears:
        data = lin.data
        wt = lin.wtype
        if api.prefers_repacked():
            wt, data = api.repacked(wt, data, lin.out_features, lin.in_features)
        x1 = rng.standard_normal((1, lin.in_features)).astype(np.float32)
        xp = rng.standard_normal((prompt_tokens, lin.in_features)).astype(np.float32)
        prepared.append((lin, wt, data, x1, xp))

    def decode_pass() -> None:
        for lin, wt, data, x1, _ in prepared:
            api.linear_f32(wt, data, lin.out_features, lin.in_features, x1, threads)

    def prompt_pass() -> None:
        for lin, wt, data, _, xp in prepared:
            api.linear_f32(wt, data, lin.out_features, lin.in_features, xp, threads)

    decode_pass()  # warm: page the file in, start the thread pool
    bw = api.copy_bandwidth(nthreads=threads)
    t_tok = best_time(decode_pass, seconds)
    t_prompt = best_time(prompt_pass, seconds, min_runs=1)
    weight_bytes = sum(int(p[2].size) for p in prepared)
    decode_tps = 1.0 / t_tok
    prompt_tps = prompt_tokens / t_prompt
    gbs = weight_bytes / t_tok / 1e9
    doc = {
        "kernel_path": api.kernel_path(),
        "threads": threads or api.default_threads(),
        "linears": len(linears),
        "weight_bytes": weight_bytes,
        "types": sorted({lin.ggml_type for lin in linears}),
        "decode_tokens_per_s": round(decode_tps, 2),
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": round(prompt_tps, 2),
        "weight_gbs": round(gbs, 2),
        **{f"machine_{k}": round(v, 2) for k, v in bw.items()},
        "weight_gbs_over_copy": round(gbs / bw["copy_gbs"], 3),
        "note": "linear layers only (attention, norms and sampling excluded)",
    }
    if price_per_hour is not None:
        doc["price_per_hour"] = price_per_hour
        doc["usd_per_million_decode_tokens"] = round(price_per_hour / 3600.0 / decode_tps * 1e6, 4)
        doc["usd_per_million_prompt_tokens"] = round(price_per_hour / 3600.0 / prompt_tps * 1e6, 4)
    return doc
