"""Layer-streamed quantization of a whole Llama checkpoint with RTN, GPTQ, AWQ or AWQ then GPTQ.

For each decoder layer i, with the calibration hidden states h_i (n_samples, seq_len, hidden) that the
ALREADY QUANTIZED layers 0..i-1 produced:
1. AWQ: a statistics pass of `quantize.sequential.run_layer` over h_i with layer i's original weights
   (the calibration engine's products and attention, h_i left as it is) gives each input group's Hessian
   and mean |x|; the scales are searched on them and folded (`quantize.awq`);
2. `quantize.sequential.run_layer`: one forward over h_i that stops at each input group (q/k/v, o,
   gate/up, down) to gather the Hessian of the inputs the group really sees — produced by the groups
   already quantized — and quantize it (GPTQ; RTN for plain AWQ, which needs no Hessian), then goes on
   with the quantized weights. Its output is h_{i+1}: later layers are calibrated on the inputs they
   will really see (errors do not compound unnoticed).
RTN needs no calibration: it skips the forward passes entirely.

The head is quantized by GPTQ on its own input's Hessian (the final-normed hidden states of the calibration
tokens) whenever the algorithm uses GPTQ: an untied lm_head after the last layer, from the states the
quantized layers produced; a tied table (embedding and head in one tensor) before layer 0 — it is also the
embedding the layers are calibrated on — from one extra pass of the float model (the layers unquantized,
the same bfloat16 engine, no Hessians). On the demo model (tied, int4 g32, GPTQ layers) the 4-bit table is
most of the error: mean KL 0.16 with the table in float, 0.31 with only the head at 4 bits by RTN, 0.36 with
both; GPTQ of the head is what this buys back. It costs one more pass (ONNX int4_g32 GPTQ, 36 x 512
tokens: 168 against 107 CPU-s), so an 8-bit head grid (Q8_0, int8: the llama.cpp mixes' tied table) keeps RTN —
at 8 bits GPTQ moves little (on the demo model its Q8_0 codes equal RTN's). An untied embedding is only
gathered, and plain RTN (no products read it); RTN algorithms and AWQ alone quantize the head by RTN as well.
The final norm stays float32.
With tied embeddings only `model.embed_tokens.weight` is produced (the head reads it).

Memory model (what is resident at the peak, demo model numbers for 128 samples x 512 tokens):
- hidden states of the current layer, updated in place: N·L·hidden·4 B             (151 MB)
- between groups, norm(h) (N·L·hidden·2 B in bfloat16, 75 MB) with the attention output N·L·heads·d·4 B
  (151 MB), later with the MLP activation N·L·inter·2 B (bfloat16, 201 MB) — see `quantize.sequential`;
  measured peak RSS for GPTQ INT4 g64 at 128 x 512 (bench/quantize_bench.py): 0.66 GB
- of one layer's weights, only the group being quantized: read from the checkpoint when its group comes
  (GPTQ scans `gptq.GPTQ_ROW_FLOATS` weights at a time), its dequantized float32 copy for the forward, the
  codes of the groups done, the packed products in use; AWQ reads the whole layer (original and folded)
- AWQ: nothing more by default (its statistics pass reuses the buffers and leaves h as it is); with
  `awq_samples` a copy of that many windows' hidden states and that pass's own activation buffers
- statistics: per input group one float32 (in, in) running Gram sum per lane (`sequential.sum_lanes`: 4 at
  the demo's widths, 1 at 14336), which becomes the Hessian and then GPTQ's inverse factor in place
  (`hessian.mean_hessian`, `gptq.prepare_hessian(overwrite=True)`): at an 8B model's down_proj, 822 MB once
- per worker, one batch's fused q/k/v product batch·L·(heads + 2·kv_heads)·d·4 B (8 samples: 16 MB) and
  attention's scratch; the gate/up product is never written (the activation is formed in its tiles)
- the embedding matrix while it is quantized: its codes (1 B per weight), read and quantized a block of rows
  at a time, and whatever the consumer keeps of the yielded tensors (the writers append as they go; `qkiln
  quantize` keeps every tensor's codes until it writes).
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
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from qkiln.errors import QuantizeError
from qkiln.kernels import elementwise as ew
from qkiln.model.config import LlamaConfig
from qkiln.model.names import INPUT_GROUPS, LINEARS, NORMS, expected_shapes
from qkiln.model.source import LazyRows, TensorSource, read_lazily
from qkiln.quantize.algorithms import ALGORITHMS
from qkiln.quantize.awq import GroupStats, awq_layer
from qkiln.quantize.gptq import GridMode, gptq_quantize, gptq_quantize_shared, prepare_hessian
from qkiln.quantize.hessian import HessianSum
from qkiln.quantize.matmul import matmul_engine
from qkiln.quantize.rtn import quantize_rtn
from qkiln.quantize.scheme import Scheme
from qkiln.quantize.sequential import LayerBuffers, run_layer
from qkiln.quantize.tensor import QuantizedTensor
from qkiln.runtime.llama import LlamaModel

log = logging.getLogger(__name__)

ALGOS = ALGORITHMS
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


# How many calibration windows (evenly spaced) AWQ's statistics pass runs over by default: all of them, as AutoAWQ
# does. A subset is faster (the pass costs ~0.85 of a GPTQ pass per window) and the knob stays (`awq_samples`), but
# it was not free: AWQ+GPTQ Q4_0 on the demo model at 36 x 512, statistics from 16 windows against all 36, mean KL
# against the F32 GGUF (llama-perplexity) on a selection text disjoint from calibration and evaluation (Artistic +
# BSD + CC0-1.0 + MPL-1.1, 17 x 512): 0.1139 against 0.1030.
AWQ_SAMPLES: int | None = None


def awq_windows(n: int, awq_samples: int | None) -> np.ndarray | None:
    """Indices (sorted, distinct) of the `awq_samples` windows of n, evenly spaced; None for all of them."""
    if awq_samples is None or awq_samples >= n:
        return None
    if awq_samples < 1:
        raise QuantizeError(f"AWQ needs at least one calibration window for its statistics, got {awq_samples}")
    return np.unique(np.linspace(0, n - 1, awq_samples).round().astype(np.int64))


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
        log.warning(
            "calibration text holds %d windows of %d tokens, not the %d asked for; using %d "
            "(pass --samples %d to say so, or a longer --calib text for more)", have, seq_len, n_samples, n, n)
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


def _awq_statistics(h: np.ndarray, tensors: dict[str, np.ndarray], cfg: LlamaConfig, model: LlamaModel,
                    engine: Any, batch_samples: int, buffers: LayerBuffers) -> dict[str, GroupStats]:
    """AWQ's statistics of the ORIGINAL layer over hidden states h (left as they are): per input group, the
    Hessian and mean |x| of the inputs the float weights produce — one statistics pass of
    `sequential.run_layer` (the calibration engine's products and attention, batches on every core)."""
    hessians: dict[str, np.ndarray] = {}
    abs_means: dict[str, np.ndarray] = {}

    def record(group: str, hess: np.ndarray | None) -> dict[str, np.ndarray]:
        assert hess is not None
        hessians[group] = hess
        return {n: tensors[n] for n in INPUT_GROUPS[group]}

    run_layer(h, {n: tensors[n] for n in NORMS}, cfg, model.rope, record, engine, batch_samples=batch_samples,
              buffers=buffers, abs_means=abs_means, statistics_only=True)
    return {g: GroupStats(h=hessians[g], abs_mean=abs_means[g]) for g in INPUT_GROUPS}


class _LayerTensors(Mapping[str, "np.ndarray | LazyRows"]):
    """A decoder layer's tensors by short name, read from the source when asked (linears as `LazyRows` where
    the source reads from disk), never kept: a group's weights are in memory only while it is quantized."""

    def __init__(self, source: TensorSource, prefix: str):
        self.source, self.prefix = source, prefix

    def __getitem__(self, name: str) -> np.ndarray | LazyRows:
        return read_lazily(self.source, self.prefix + name + ".weight")

    def __iter__(self) -> Iterator[str]:
        return iter((*LINEARS, *NORMS))

    def __len__(self) -> int:
        return len(LINEARS) + len(NORMS)


class _GroupQuantizer:
    """`sequential.run_layer`'s callback: quantize one input group's linears (GPTQ on the Hessian it is
    given, RTN when it gets none, float for linears the rules keep), record them in `out`, and return
    them dequantized for the rest of the layer's forward."""

    def __init__(self, tensors: Mapping[str, np.ndarray | LazyRows], schemes: dict[str, Scheme | None], prefix: str,
                 out: dict[str, QuantizedTensor | np.ndarray | LazyRows], *, damp: float, act_order: bool, block_size: int,
                 grid: GridMode, weighted_fit: bool):
        self.tensors, self.schemes, self.prefix, self.out = tensors, schemes, prefix, out
        self.damp, self.act_order, self.block_size, self.grid = damp, act_order, block_size, grid
        self.weighted_fit = weighted_fit

    def __call__(self, group: str, hess: np.ndarray | None) -> dict[str, np.ndarray]:
        names, p, out = INPUT_GROUPS[group], self.prefix, self.out
        by_scheme: dict[Scheme, list[str]] = {}
        for n in names:  # linears sharing an input AND a scheme are scanned together
            sch = self.schemes[n]
            if sch is None:
                out[n] = np.asarray(self.tensors[n], dtype=np.float32)
            elif hess is None:
                out[n] = _rtn_or_keep(self.tensors[n], p + n + ".weight", sch)
            else:
                by_scheme.setdefault(sch, []).append(n)
        if by_scheme:
            assert hess is not None
            prep = prepare_hessian(hess, damp=self.damp, act_order=self.act_order, name=f"{p}{group}", overwrite=True)
            for sch, same in by_scheme.items():
                got = gptq_quantize_shared({p + n + ".weight": self.tensors[n] for n in same}, prep, sch,
                                           block_size=self.block_size, grid=self.grid,
                                           weighted_fit=self.weighted_fit)
                out.update({n: got[p + n + ".weight"] for n in same})
        return {n: _dense(out[n]) for n in names}


def quantize_model(source: TensorSource, *args: Any, **kwargs: Any) -> Iterator[tuple[str, QuantizedTensor | np.ndarray | LazyRows]]:
    """`_quantize_model`'s tensors, checked against `output_order` as they come (what a writer planned for)."""
    order = iter(output_order(source.config))
    for name, value in _quantize_model(source, *args, **kwargs):
        want = next(order, None)
        if name != want:
            raise AssertionError(f"quantize_model yielded {name} where output_order has {want}")
        yield name, value


def _quantize_model(
    source: TensorSource,
    rules_or_scheme: Scheme | SchemeFor | _Rules,
    algo: str,
    calib_ids: np.ndarray | None,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
    grid: GridMode = "updated",
    weighted_fit: bool = True,
    awq_grid: int = 20,
    awq_clip: bool | None = None,
    awq_samples: int | None = AWQ_SAMPLES,
    batch_samples: int = 8,
    calib_dtype: str = "bfloat16",
    gptq_head: bool = True,
    progress: Progress | None = None,
    report: QuantizeReport | None = None,
) -> Iterator[tuple[str, QuantizedTensor | np.ndarray | LazyRows]]:
    """Yield (HF tensor name, QuantizedTensor for a quantized weight | float32 array) for every tensor.

    Layer i's tensors are yielded as soon as layer i is done, so a consumer can write incrementally.
    `calib_ids` (n_samples, seq_len) is required unless algo is 'rtn'. `awq_clip` defaults to True for
    'awq' and False for 'awq+gptq' (GPTQ's error feedback already handles outliers; clipped weights would
    make it chase the clipped matrix). `awq_samples` (None: all) is how many of the calibration windows,
    evenly spaced, AWQ's statistics pass runs over (see AWQ_SAMPLES); GPTQ always sees every window.
    `gptq_head` (with a GPTQ algorithm, on a head grid under 8 bits) quantizes lm_head or the tied table by
    GPTQ on the final-normed states (see the module docstring); False keeps RTN there.
    Shapes that no scheme fits raise QuantizeError before any work.
    """
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
    report.settings = {"damp": damp, "act_order": act_order, "block_size": block_size, "grid": grid, "weighted_fit": weighted_fit,
                       "awq_grid": awq_grid, "awq_clip": clip if use_awq else None,
                       "awq_samples": awq_samples if use_awq else None, "batch_samples": batch_samples,
                       "calib_dtype": calib_dtype}
    engine = matmul_engine(calib_dtype)

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

    model = LlamaModel(source, cache_weights=False)  # its RoPE table; layers are read from `source`
    n_layers = cfg.num_hidden_layers

    buffers = LayerBuffers()  # the activation arrays, reused from layer to layer
    awq_rows = awq_windows(len(ids), awq_samples) if use_awq and ids is not None else None
    awq_buffers = buffers if awq_rows is None else LayerBuffers()  # its own shapes: no reallocation per pass
    gptq_opts: dict[str, Any] = dict(damp=damp, act_order=act_order, block_size=block_size, grid=grid,
                                     weighted_fit=weighted_fit)
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head_scheme = schemes[head_name]
    head_by_gptq = gptq_head and use_gptq and head_scheme is not None and getattr(head_scheme, "bits", 8) < 8

    report.settings["gptq_head"] = head_by_gptq
    embed_q: QuantizedTensor | np.ndarray | LazyRows
    if head_by_gptq and cfg.tie_word_embeddings:
        assert ids is not None and head_scheme is not None
        if progress is not None:
            progress("head statistics (float pass)", 0, n_layers)
        table = np.asarray(source.tensor(head_name), dtype=np.float32)
        final = _float_pass(source, cfg, model, _embed(table, ids, cfg.vocab_size), engine, batch_samples, buffers)
        embed_q = _gptq_head(table, final, source, cfg, head_scheme, head_name, **gptq_opts)
        del table, final
    else:
        embed_q = _rtn_or_keep(source, "model.embed_tokens.weight", schemes["model.embed_tokens.weight"])
    yield "model.embed_tokens.weight", embed_q
    h = _embed(embed_q, ids, cfg.vocab_size) if ids is not None else None  # (n, L, hidden)
    del embed_q

    for i in range(n_layers):
        t0 = time.perf_counter()
        if progress is not None:
            progress(f"layer {i}", i, n_layers)
        p = f"model.layers.{i}."
        # the linears are read when their group is quantized (a block of rows at a time by RTN and GPTQ), not
        # up front: at 8B a layer is 0.9 GB in float32. AWQ reads them all (its scales fold across groups).
        layer = _LayerTensors(source, p)
        layer_schemes = {n: schemes[p + n + ".weight"] for n in LINEARS}
        out: dict[str, QuantizedTensor | np.ndarray | LazyRows] = {}
        norms = {n: np.asarray(layer[n], dtype=np.float32) for n in NORMS}
        if algo == "rtn":
            for n in LINEARS:
                out[n] = _rtn_or_keep(layer[n], p + n + ".weight", layer_schemes[n])
        else:
            assert h is not None
            tensors: Mapping[str, np.ndarray | LazyRows] = layer
            if use_awq:  # scales are searched on the ORIGINAL layer's statistics, then folded
                floats = {n: np.asarray(layer[n], dtype=np.float32) for n in (*LINEARS, *NORMS)}
                stats = _awq_statistics(h if awq_rows is None else h[awq_rows], floats, cfg, model, engine,
                                        batch_samples, awq_buffers)
                res = awq_layer(floats, stats, layer_schemes, cfg, n_grid=awq_grid, clip=clip)
                del stats, floats
                tensors = res.tensors
                norms = {n: res.tensors[n] for n in NORMS}
                report.awq[str(i)] = res.info

            quantize_group = _GroupQuantizer(tensors, layer_schemes, p, out, **gptq_opts)
            h = run_layer(h, norms, cfg, model.rope, quantize_group, engine, batch_samples=batch_samples,
                          need_hessian=use_gptq, buffers=buffers)
            del tensors, quantize_group
        out.update(norms)
        report.layer_seconds.append(time.perf_counter() - t0)  # the layer's work, not the consumer's
        report.peak_rss_bytes = peak_rss_bytes()
        for n in (*LINEARS, *NORMS):
            yield p + n + ".weight", out[n]
        del out
    yield "model.norm.weight", np.asarray(source.tensor("model.norm.weight"), dtype=np.float32)
    if not cfg.tie_word_embeddings:
        if head_by_gptq:
            assert h is not None and head_scheme is not None
            w = np.asarray(source.tensor(head_name), dtype=np.float32)
            yield head_name, _gptq_head(w, h, source, cfg, head_scheme, head_name, **gptq_opts)
        else:
            yield head_name, _rtn_or_keep(source, head_name, head_scheme)
    del h
    if progress is not None:
        progress("done", n_layers, n_layers)
    report.wall_seconds = time.perf_counter() - t_start
    report.peak_rss_bytes = peak_rss_bytes()


def output_order(cfg: LlamaConfig) -> list[str]:
    """The HF names `quantize_model` yields, in its order: the embeddings, each layer's linears then norms,
    the final norm, and the head when it is not tied. A consumer that must know the order before the work
    (a file header) reads it here; `quantize_model` checks that it keeps to it."""
    order = ["model.embed_tokens.weight"]
    for i in range(cfg.num_hidden_layers):
        order += [f"model.layers.{i}.{n}.weight" for n in (*LINEARS, *NORMS)]
    order.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        order.append("lm_head.weight")
    return order


def _float_pass(source: TensorSource, cfg: LlamaConfig, model: LlamaModel, h: np.ndarray, engine: Any,
                batch_samples: int, buffers: LayerBuffers) -> np.ndarray:
    """The float model's last hidden states (n, L, hidden) from its embeddings `h` (consumed): every layer
    through the calibration engine with its original weights, no statistics."""
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors = {n: np.asarray(source.tensor(p + n + ".weight"), dtype=np.float32) for n in (*LINEARS, *NORMS)}

        def floats(group: str, hess: np.ndarray | None, tensors: dict[str, np.ndarray] = tensors) -> dict[str, np.ndarray]:
            return {n: tensors[n] for n in INPUT_GROUPS[group]}

        h = run_layer(h, {n: tensors[n] for n in NORMS}, cfg, model.rope, floats, engine, batch_samples=batch_samples,
                      need_hessian=False, buffers=buffers)
    return h


def _gptq_head(w: np.ndarray, h: np.ndarray, source: TensorSource, cfg: LlamaConfig, scheme: Scheme, name: str,
               *, damp: float, act_order: bool, **gptq: Any) -> QuantizedTensor:
    """GPTQ of the head `w` (vocab, hidden) on the Hessian of its input: the final norm of hidden states `h`."""
    norm = np.asarray(source.tensor("model.norm.weight"), dtype=np.float32)
    hess = HessianSum(cfg.hidden_size)
    for sample in h:  # (L, hidden) at a time: the normed copy of all states is never held
        hess.add(ew.rms_norm(np.ascontiguousarray(sample, dtype=np.float32), norm, cfg.rms_norm_eps))
    prep = prepare_hessian(hess.mean(), damp=damp, act_order=act_order, name=name)
    return gptq_quantize(w, prep, scheme, name=name, **gptq)


def _embed(table: QuantizedTensor | np.ndarray | LazyRows, ids: np.ndarray, vocab: int) -> np.ndarray:
    """The calibration tokens' embeddings (n, L, hidden) through the QUANTIZED table, as the result will
    run; only the rows the tokens use are decoded (a few thousand of the vocabulary's tens of thousands)."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise QuantizeError(f"calibration token ids {int(ids.min())}..{int(ids.max())} fall outside the "
                            f"vocabulary of {vocab}; the tokenizer does not match the checkpoint")
    used, where = np.unique(ids, return_inverse=True)
    rows = table.take_rows(used).dequantize() if isinstance(table, QuantizedTensor) else table[used]
    return np.asarray(rows, dtype=np.float32)[where.reshape(ids.shape)]


def _dense(v: QuantizedTensor | np.ndarray) -> np.ndarray:
    return v.dequantize() if isinstance(v, QuantizedTensor) else v


def _rtn_or_keep(w: np.ndarray | LazyRows | TensorSource, name: str,
                 scheme: Scheme | None) -> QuantizedTensor | np.ndarray | LazyRows:
    """RTN on `scheme`, or the float32 tensor when the rules keep it in float (a source's 2-D tensor as
    `LazyRows`: read a block of rows at a time by RTN and by the writer)."""
    arr = read_lazily(w, name) if not isinstance(w, (np.ndarray, LazyRows)) else w
    if scheme is None:
        return arr if isinstance(arr, LazyRows) else np.asarray(arr, dtype=np.float32)
    return quantize_rtn(arr, scheme, name=name)


def _shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    return expected_shapes(cfg, with_head=True)
