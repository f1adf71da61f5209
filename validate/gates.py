"""Acceptance thresholds as data, and the checks that turn measured metrics into a CI verdict.

A `Thresholds` says what an artifact must reach; `check_metrics` compares one artifact's metrics with it
and returns one `Check` per threshold (passed or not, with the measured value and the limit), so the CLI
can print them, `--junit` can list them and the manifest can record them. A metric that was not measured
(e.g. no speed floor asked) produces no check; a threshold whose metric is missing fails, naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from qkiln.errors import GateFailed

# threshold field -> (metric it bounds, direction "max"/"min", human name, valid range (lo, hi))
THRESHOLDS: dict[str, tuple[str, str, str, tuple[float, float]]] = {
    "max_mean_kl": ("mean_kl", "max", "mean KL divergence (nats)", (0.0, 100.0)),
    "max_ppl_increase_pct": ("ppl_increase_pct", "max", "perplexity increase (%)", (0.0, 10_000.0)),
    "min_top1": ("top1_agreement", "min", "top-1 agreement", (0.0, 1.0)),
    "min_decode_tokens_per_s": ("decode_tokens_per_s", "min", "decode tokens/s on this machine", (0.0, 1e9)),
    "max_isa_kl": ("isa_mean_kl", "max", "mean KL of the target-ISA logits from the host's (nats)", (0.0, 100.0)),
}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """What an artifact must reach. None = not gated. Ranges: KL >= 0, increase in % >= 0, top-1 in [0, 1]."""

    max_mean_kl: float | None = None
    max_ppl_increase_pct: float | None = None
    min_top1: float | None = None
    min_decode_tokens_per_s: float | None = None
    max_isa_kl: float | None = None

    def __post_init__(self) -> None:
        for field, (_, _, label, (lo, hi)) in THRESHOLDS.items():
            v = getattr(self, field)
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"{field} = {v} is out of range for {label}: expected {lo} to {hi}")

    def merged(self, override: Thresholds | None) -> Thresholds:
        """This set with every non-None field of `override` replacing ours."""
        if override is None:
            return self
        changes = {f: getattr(override, f) for f in THRESHOLDS if getattr(override, f) is not None}
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in THRESHOLDS if getattr(self, f) is not None}


@dataclasses.dataclass(frozen=True)
class Check:
    """One threshold applied to one artifact's metric."""

    artifact: str
    threshold: str  # a THRESHOLDS key, or "baseline:<metric>" for a regression check
    metric: str
    value: float | None
    limit: float
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fmt(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.6g}"


def check_metrics(artifact: str, metrics: Mapping[str, float | None], thresholds: Thresholds) -> list[Check]:
    """One Check per threshold set in `thresholds`, in THRESHOLDS order."""
    out = []
    for field, (metric, direction, label, _) in THRESHOLDS.items():
        limit = getattr(thresholds, field)
        if limit is None:
            continue
        value = metrics.get(metric)
        if value is None:
            ok = False
        else:
            ok = value <= limit if direction == "max" else value >= limit
        op = "<=" if direction == "max" else ">="
        msg = f"{artifact}: {metric} {_fmt(value)} {'meets' if ok else 'fails'} {field} ({label} {op} {limit:g})"
        out.append(Check(artifact, field, metric, value, limit, ok, msg))
    return out


def ppl_increase_pct(ppl: float, ref_ppl: float) -> float:
    """Relative perplexity increase in percent (negative when the artifact scores better)."""
    return 100.0 * (ppl / ref_ppl - 1.0)


def raise_on_failures(checks: Iterable[Check]) -> None:
    """GateFailed (exit 1) naming every failed metric, or nothing when all passed."""
    failed = [c for c in checks if not c.passed]
    if failed:
        raise GateFailed("validation failed: " + "; ".join(c.message for c in failed))
