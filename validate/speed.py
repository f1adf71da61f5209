"""Speed of an artifact: measured on this machine, estimated for the target, and what a million tokens cost.

Measured here (qkiln.kernels.speed, the library behind `qkiln bench`): prompt and decode tokens/s of every
weight product on the artifact's own blocks, and the weight bytes streamed per decoded token over this
machine's read bandwidth measured in the same run — the share of the memory bandwidth decode reaches.

Estimated for the target: decode is bound by streaming the weights once per token, so
    target tokens/s ~= efficiency here x target bandwidth / bytes per token,
an ESTIMATE (same efficiency assumed; attention, norms and sampling not counted), labelled so wherever it is
shown. Cost per million tokens = price per hour / 3600 / tokens per s x 1e6, from the recipe's price.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qkiln.kernels.speed import bench_linears, gguf_linears


def measure_speed(gguf: Path, *, seconds: float = 0.5, prompt_tokens: int = 64, threads: int | None = None) -> dict[str, Any]:
    """This machine's figures for `gguf` (kernel path, tokens/s, GB/s, share of read bandwidth)."""
    doc = bench_linears(gguf_linears(gguf), threads=threads, prompt_tokens=prompt_tokens, seconds=seconds)
    doc["bandwidth_share"] = round(doc["weight_gbs"] / doc["machine_read_gbs"], 3) if doc["machine_read_gbs"] else None
    doc.pop("note", None)
    return doc


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
