"""Layer-streamed quantization of a whole Llama checkpoint with RTN, GPTQ, AWQ or AWQ then GPTQ.

For each decoder layer i, with the calibration hidden states h_i (n_samples, seq_len, hidden) that the
ALREADY QUANTIZED layers 0..i-1 produced:
1. run layer i (original weights) over h_i in batches of samples, observing the input of each linear:
   per input group (q/k/v share one, gate/up share one, o, down) GPTQ's Hessian H = 2XᵀX/n and, for
   AWQ, the mean |x| per channel — running sums, no activation is kept past its batch;
2. quantize the layer's 7 linears (AWQ scales searched and folded first when asked; folded norms are
   part of the output), each on the scheme the rules give its name;
3. put the dequantized weights in place and run the QUANTIZED layer over h_i to get h_{i+1}, so later
   layers are calibrated on the inputs they will really see (errors do not compound unnoticed).
RTN needs no calibration: it skips the forward passes entirely.

Embeddings and lm_head are quantized by RTN on their own grid (no Hessian for a lookup table; the
head's input statistics would need the whole model run once more); the final norm stays float32.
With tied embeddings only `model.embed_tokens.weight` is produced (the head reads it).

Memory model (what is resident at the peak, demo model numbers for 128 samples x 512 tokens):
- hidden states in and out of the current layer: 2 · N·L·hidden·4 B           (2 x 151 MB)
- one layer's weights: original, folded, dequantized float32 (~3 x 14 MB) — the runtime runs with
  cache_weights=False and reads each layer's tensors from the (memory-mapped) checkpoint when it runs;
  `_Overlay` holds only the current layer's replaced tensors and drops them when the layer is done
- statistics: per input group (in, in) float64 Hessian (+ a temporary): 3·576² + 1536² doubles ≈ 27 MB
- one batch's activations inside the layer: batch·L·(3·inter + 6·hidden)·4 B      (8 samples: ~130 MB)
- the embedding matrix while it is quantized (vocab·hidden·4 B, 113 MB) and whatever the consumer
  keeps of the yielded tensors (the CLI's writer keeps them all: the output checkpoint's size).
It never holds more than one layer's activations, nor the model's weights in float32 (except through
the consumer). Peak RSS is recorded in `QuantizeReport.peak_rss_bytes` (getrusage; includes the
interpreter and BLAS buffers).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.quantize.awq import GROUP_OF, INPUT_GROUPS, LINEARS, NORMS, GroupStats, awq_layer
from qkiln.quantize.gptq import GridMode, gptq_quantize_shared, prepare_hessian
from qkiln.quantize.hessian import abs_mean_sum, accumulate_hessian, empty_hessian
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.tensor import QuantizedTensor
from qkiln.runtime.config import LlamaConfig
from qkiln.runtime.source import TensorSource

log = logging.getLogger(__name__)

ALGOS = ("rtn", "gptq", "awq", "awq+gptq")
SchemeFor = Callable[[str, tuple[int, ...]], Scheme]
Resolver = Callable[[str, tuple[int, ...]], tuple[Scheme | None, str | None]]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _Rules(Protocol):
    def resolve(self, name: str, shape: tuple[int, ...]) -> tuple[Scheme | None, str | None]: ...


def scheme_resolver(rules_or_scheme: Scheme | SchemeFor | _Rules) -> Resolver:
    """name, shape -> (scheme or None = keep in float, fallback reason) from a single scheme (strict:
    a shape it cannot hold is a QuantizeError), a function name, shape -> Scheme, or a
    `quantize.rules.RuleSet` (its per-tensor fallbacks and "keep" rules apply)."""
    if isinstance(rules_or_scheme, Scheme):
        scheme = rules_or_scheme
        return lambda name, shape: (scheme, None)
    if hasattr(rules_or_scheme, "resolve"):
        return rules_or_scheme.resolve
    fn = rules_or_scheme
    return lambda name, shape: (fn(name, shape), None)  # type: ignore[operator]


def calibration_ids(token_ids: np.ndarray, n_samples: int, seq_len: int) -> np.ndarray:
    """(n, seq_len) int64 consecutive non-overlapping windows of the text's tokens, n <= n_samples.

    A text shorter than one window is a QuantizeError saying how many tokens it had and needs; a text
    shorter than n_samples windows gives as many full windows as it holds (logged).
    """
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if n_samples < 1 or seq_len < 1:
        raise QuantizeError(f"calibration needs --samples >= 1 and --seq-len >= 1, got {n_samples} and {seq_len}")
    have = len(ids) // seq_len
    if have == 0:
        raise QuantizeError(
            f"calibration text has {len(ids)} tokens, one sample needs {seq_len}; "
            "pass a longer --calib text or a smaller --seq-len"
        )
    n = min(n_samples, have)
    if n < n_samples:
        log.warning("calibration text holds %d samples of %d tokens, not %d; using %d", have, seq_len, n_samples, n)
    return ids[: n * seq_len].reshape(n, seq_len)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports kilobytes)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclasses.dataclass
class QuantizeReport:
    """Filled in while `quantize_model` runs; what `quantization.json` records."""

    algo: str
    n_samples: int = 0
    seq_len: int = 0
    schemes: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> scheme name ("keep" = float)
    fallbacks: dict[str, str] = dataclasses.field(default_factory=dict)  # tensor -> why its scheme changed
    layer_seconds: list[float] = dataclasses.field(default_factory=list)
    awq: dict[str, Any] = dataclasses.field(default_factory=dict)  # layer -> group -> alpha/loss
    wall_seconds: float = 0.0
    peak_rss_bytes: int = 0
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class _Overlay:
    """A TensorSource that serves replaced tensors for the current layer and the base source otherwise."""

    def __init__(self, base: TensorSource):
        self.base = base
        self.config: LlamaConfig = base.config
        self.replaced: dict[str, np.ndarray] = {}

    def names(self) -> list[str]:
        return self.base.names()

    def tensor(self, name: str) -> np.ndarray:
        got = self.replaced.get(name)
        return got if got is not None else self.base.tensor(name)


class _Stats:
    """Running statistics of one layer's linear inputs, per input group (fed by the runtime's observer)."""

    def __init__(self, config: LlamaConfig, need_abs: bool):
        dims = {"attn_in": config.hidden_size, "attn_out": config.num_attention_heads * config.head_dim,
                "mlp_in": config.hidden_size, "mlp_out": config.intermediate_size}
        self.h = {g: empty_hessian(d) for g, d in dims.items()}
        self.abs = {g: np.zeros(d, np.float64) for g, d in dims.items()} if need_abs else None
        self.first = {names[0] for names in INPUT_GROUPS.values()}

    def __call__(self, linear: str, x2d: np.ndarray) -> None:
        if linear not in self.first:  # k/v see q's input, up sees gate's: counted once
            return
        g = GROUP_OF[linear]
        self.h[g] = accumulate_hessian(*self.h[g], x2d)
        if self.abs is not None:
            self.abs[g] = abs_mean_sum(self.abs[g], x2d)

    def groups(self) -> dict[str, GroupStats]:
        out = {}
        for g, (h, n) in self.h.items():
            a = self.abs[g] / max(n, 1) if self.abs is not None else np.zeros(h.shape[0])
            out[g] = GroupStats(h=h, abs_mean=a)
        return out


def quantize_model(
    source: TensorSource,
    rules_or_scheme: Scheme | SchemeFor | _Rules,
    algo: str,
    calib_ids: np.ndarray | None,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    grid: GridMode = "updated",
    awq_grid: int = 20,
    awq_clip: bool | None = None,
    batch_samples: int = 8,
    progress: Progress | None = None,
    report: QuantizeReport | None = None,
) -> Iterator[tuple[str, QuantizedTensor | np.ndarray]]:
    """Yield (HF tensor name, QuantizedTensor for a quantized weight | float32 array) for every tensor.

    Layer i's tensors are yielded as soon as layer i is done, so a consumer can write incrementally.
    `calib_ids` (n_samples, seq_len) is required unless algo is 'rtn'. `awq_clip` defaults to True for
    'awq' and False for 'awq+gptq' (GPTQ's error feedback already handles outliers; clipped weights would
    make it chase the clipped matrix). Shapes that no scheme fits raise QuantizeError before any work.
    """
    from qkiln.runtime.llama import LlamaModel

    if algo not in ALGOS:
        raise QuantizeError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    t_start = time.perf_counter()
    report = report if report is not None else QuantizeReport(algo=algo)
    report.algo = algo
    cfg = source.config
    resolve = scheme_resolver(rules_or_scheme)
    use_awq = algo in ("awq", "awq+gptq")
    use_gptq = algo in ("gptq", "awq+gptq")
    clip = (algo == "awq") if awq_clip is None else awq_clip
    report.settings = {"damp": damp, "act_order": act_order, "block_size": block_size, "grid": grid,
                       "awq_grid": awq_grid, "awq_clip": clip if use_awq else None, "batch_samples": batch_samples}

    # Every quantized tensor's scheme, checked up front: a bad group size fails before minutes of work.
    quantized_names = ["model.embed_tokens.weight"]
    if not cfg.tie_word_embeddings:
        quantized_names.append("lm_head.weight")
    for i in range(cfg.num_hidden_layers):
        quantized_names += [f"model.layers.{i}.{n}.weight" for n in LINEARS]
    shapes = _shapes(cfg)
    schemes: dict[str, Scheme | None] = {}
    for name in quantized_names:
        scheme, reason = resolve(name, shapes[name])
        if scheme is not None:
            scheme.check_shape(shapes[name], name)
        schemes[name] = scheme
        report.schemes[name] = scheme.name if scheme is not None else "keep"
        if reason:
            report.fallbacks[name] = reason
            log.info("%s: %s", name, reason)

    ids: np.ndarray | None = None
    if algo != "rtn":
        if calib_ids is None:
            raise QuantizeError(f"--algo {algo} needs calibration text (--calib)")
        ids = np.asarray(calib_ids, dtype=np.int64)
        assert ids.ndim == 2, ids.shape
        report.n_samples, report.seq_len = ids.shape

    overlay = _Overlay(source)
    model = LlamaModel(overlay, cache_weights=False)
    n_layers = cfg.num_hidden_layers

    embed_q = _rtn_or_keep(source, "model.embed_tokens.weight", schemes["model.embed_tokens.weight"])
    yield "model.embed_tokens.weight", embed_q
    h: np.ndarray | None = None
    if ids is not None:
        overlay.replaced["model.embed_tokens.weight"] = _dense(embed_q)
        h = model.embed(ids)  # (n, L, hidden) — through the QUANTIZED embeddings, as the result will run
        overlay.replaced.clear()
    del embed_q

    batches = [(b0, min(b0 + batch_samples, len(ids))) for b0 in range(0, len(ids), batch_samples)] if ids is not None else []
    for i in range(n_layers):
        t0 = time.perf_counter()
        if progress is not None:
            progress(f"layer {i}", i, n_layers)
        p = f"model.layers.{i}."
        tensors = {n: np.asarray(source.tensor(p + n + ".weight"), dtype=np.float32) for n in (*LINEARS, *NORMS)}
        layer_schemes = {n: schemes[p + n + ".weight"] for n in LINEARS}
        out: dict[str, QuantizedTensor | np.ndarray] = {}
        if algo == "rtn":
            for n in LINEARS:
                out[n] = _rtn_or_keep(tensors[n], p + n + ".weight", layer_schemes[n])
            for n in NORMS:
                out[n] = tensors[n]
        else:
            assert h is not None
            stats = _Stats(cfg, need_abs=use_awq)
            for b0, b1 in batches:
                model.layer(i, h[b0:b1], observer=stats)
            group_stats = stats.groups()
            del stats
            if use_awq:
                res = awq_layer(tensors, group_stats, layer_schemes, cfg, n_grid=awq_grid, clip=clip)
                tensors, group_stats = res.tensors, res.stats
                report.awq[str(i)] = res.info
            for group, names in INPUT_GROUPS.items():
                if not use_gptq:
                    for n in names:
                        out[n] = _rtn_or_keep(tensors[n], p + n + ".weight", layer_schemes[n])
                    continue
                by_scheme: dict[Scheme, list[str]] = {}
                for n in names:  # linears sharing an input AND a scheme are scanned together
                    sch = layer_schemes[n]
                    if sch is None:
                        out[n] = tensors[n]
                    else:
                        by_scheme.setdefault(sch, []).append(n)
                if not by_scheme:
                    continue
                prep = prepare_hessian(group_stats[group].h, damp=damp, act_order=act_order, name=f"{p}{group}")
                for scheme, same in by_scheme.items():
                    got = gptq_quantize_shared({p + n + ".weight": tensors[n] for n in same}, prep, scheme,
                                               block_size=block_size, grid=grid)
                    out.update({n: got[p + n + ".weight"] for n in same})
            for n in NORMS:
                out[n] = tensors[n]
            del group_stats
            for n, v in out.items():
                overlay.replaced[p + n + ".weight"] = _dense(v)
            h_next = np.empty_like(h)
            for b0, b1 in batches:
                h_next[b0:b1] = model.layer(i, h[b0:b1])
            h = h_next
            overlay.replaced.clear()
        del tensors
        report.layer_seconds.append(time.perf_counter() - t0)  # the layer's work, not the consumer's
        report.peak_rss_bytes = peak_rss_bytes()
        for n in (*LINEARS, *NORMS):
            yield p + n + ".weight", out[n]
        del out
    del h
    yield "model.norm.weight", np.asarray(source.tensor("model.norm.weight"), dtype=np.float32)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", _rtn_or_keep(source, "lm_head.weight", schemes["lm_head.weight"])
    if progress is not None:
        progress("done", n_layers, n_layers)
    report.wall_seconds = time.perf_counter() - t_start
    report.peak_rss_bytes = peak_rss_bytes()


def _dense(v: QuantizedTensor | np.ndarray) -> np.ndarray:
    return v.dequantize() if isinstance(v, QuantizedTensor) else v


def _rtn_or_keep(w: np.ndarray | TensorSource, name: str, scheme: Scheme | None) -> QuantizedTensor | np.ndarray:
    """RTN on `scheme`, or the float32 tensor when the rules keep it in float."""
    arr = w.tensor(name) if not isinstance(w, np.ndarray) else w
    if scheme is None:
        return np.asarray(arr, dtype=np.float32)
    return quantize_rtn(arr, scheme, name=name)


def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    from qkiln.runtime.llama import expected_shapes

    return expected_shapes(cfg)
