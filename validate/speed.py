"""Speed of an artifact: measured on this machine, estimated for the target, and what a million tokens cost.

Measured here (qkiln.kernels.speed, the library behind `qkiln bench`): prompt and decode tokens/s of every
weight product on the artifact's own blocks, and the weight bytes streamed per decoded token over this
machine's read bandwidth measured in the same run — the share of the memory bandwidth decode reaches.

An ONNX folder is timed whole through onnxruntime (`measure_onnx_speed`): a prompt of `prompt_tokens` tokens,
then one decode step after it through the KV cache — every operator of the graph, so attention, norms and
the head are in its figures (the GGUF figures count the weight products alone).

Estimated for the target: decode is bound by streaming the weights once per token, so
    target tokens/s ~= efficiency here x target bandwidth / bytes per token,
an ESTIMATE (same efficiency assumed; attention, norms and sampling not counted), labelled so wherever it is
shown. Cost per million tokens = price per hour / 3600 / tokens per s x 1e6, from the recipe's price.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qkiln.formats.onnx_run import OnnxLlama, describe_folder
from qkiln.kernels import api
from qkiln.kernels.speed import bench_linears, best_time, gguf_linears


def measure_speed(gguf: Path, *, seconds: float = 0.5, prompt_tokens: int = 64, threads: int | None = None) -> dict[str, Any]:
    """This machine's figures for `gguf` (kernel path, tokens/s, GB/s, share of read bandwidth)."""
    doc = bench_linears(gguf_linears(gguf), threads=threads, prompt_tokens=prompt_tokens, seconds=seconds)
    doc["bandwidth_share"] = round(doc["weight_gbs"] / doc["machine_read_gbs"], 3) if doc["machine_read_gbs"] else None
    doc.pop("note", None)
    return doc


def measure_onnx_speed(folder: Path, *, seconds: float = 0.5, prompt_tokens: int = 64, threads: int | None = None
                       ) -> dict[str, Any]:
    """This machine's figures for an ONNX folder through onnxruntime (same keys as `measure_speed`)."""
    threads = threads or api.default_threads()
    model = OnnxLlama(folder, threads=threads)
    ids = ((np.arange(prompt_tokens, dtype=np.int64) * 7919 + 13) % model.config.vocab_size)[None]
    _, past = model.step(ids)  # warm: page the weights in, let onnxruntime plan its buffers
    t_prompt = best_time(lambda: model.step(ids), seconds, min_runs=1)
    t_tok = best_time(lambda: model.step(ids[:, :1], past), seconds)  # one token after the prompt's cache
    weight_bytes = describe_folder(folder)["matmul_weight_bytes"]
    read_gbs = api.copy_bandwidth(nthreads=threads)["read_gbs"]
    gbs = weight_bytes / t_tok / 1e9
    return {"kernel_path": "onnxruntime CPU (whole graph)", "threads": threads, "weight_bytes": weight_bytes,
            "decode_tokens_per_s": round(1.0 / t_tok, 2), "prompt_tokens": prompt_tokens,
            "prompt_tokens_per_s": round(prompt_tokens / t_prompt, 2), "weight_gbs": round(gbs, 2),
            "machine_read_gbs": round(read_gbs, 2), "bandwidth_share": round(gbs / read_gbs, 3) if read_gbs else None}


def target_estimate(measured: dict[str, Any], *, bandwidth_gbs: float, price_per_hour: float | None,
                    instance: str | None = None) -> dict[str, Any]:
    """Decode tokens/s on the target from its bandwidth and the efficiency measured here; $/M tokens."""
    share = measured.get("bandwidth_share") or 0.0
    bytes_per_token = measured["weight_bytes"]
    tps = share * bandwidth_gbs * 1e9 / bytes_per_token if bytes_per_token else 0.0
    out: dict[str, Any] = {
        "estimate": True,
        "basis": f"{share:.3f} of {bandwidth_gbs:g} GB/s over {bytes_per_token / 1e6:.1f} MB of weights per token",
        "decode_tokens_per_s": round(tps, 1),
        "bandwidth_gbs": bandwidth_gbs,
    }
    if instance:
        out["instance"] = instance
    if price_per_hour is not None:
        out["price_per_hour"] = price_per_hour
        out["usd_per_million_tokens"] = round(price_per_hour / 3600.0 / tps * 1e6, 4) if tps > 0 else None
    return out


def host_cost(measured: dict[str, Any], price_per_hour: float | None) -> float | None:
    """$/M decode tokens at this machine's measured speed and the given price (None without a price)."""
    if price_per_hour is None or not measured.get("decode_tokens_per_s"):
        return None
    return round(price_per_hour / 3600.0 / measured["decode_tokens_per_s"] * 1e6, 4)
