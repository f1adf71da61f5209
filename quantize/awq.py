"""AWQ (Lin et al., 2023): scale each input channel of a linear by s before quantizing, undo it in the op
that produces the linear's input, so channels with large activations get finer effective steps.

For y = W x and per-input-channel s: y = (W·diag(s)) (x / s). The quantized weight is Q(W·diag(s)); the
division x / s is folded, exactly, into the op before:

- input_layernorm weight ÷ s   → q_proj, k_proj, v_proj columns × s            ("attn_in")
- v_proj rows ÷ s              → o_proj columns × s                            ("attn_out")
  Attention is linear in v, so scaling v's output channel (kv head j, dim d) by 1/t scales the attention
  output of every query head that reads kv head j. With grouped-query attention (n_rep query heads per
  kv head) o_proj's input has n_heads·head_dim columns but v only n_kv·head_dim rows, so s is TIED:
  one value per (kv head, dim), repeated over that kv head's n_rep query heads (statistics averaged).
- post_attention_layernorm ÷ s → gate_proj, up_proj columns × s                ("mlp_in")
- up_proj rows ÷ s             → down_proj columns × s (silu(gate)·up is linear in up)  ("mlp_out")

Scale search: s = mean|x|^α (normalised so that sqrt(max·min) = 1, floored at 1e-4), α on a grid of
`n_grid` values in [0, 1), searched coarse to fine; the α minimising the summed output error of the
group's linears, quantized by RTN on their own grids, is kept. The output error of W' against W on the
calibration tokens is tr((W' − W) H (W' − W)ᵀ)/2 with GPTQ's Hessian H = 2XᵀX/n (`quantize.hessian`) —
exact over every calibration token, at a cost independent of their number (formed as ||(W' − W) L||² with
H's Cholesky factor L, block-triangularly: about half the multiply-adds of the dense product).

Clipping search (optional): for each group of each linear except q/k (their error passes through the
q·k product, where per-linear output error is a poor proxy — AutoAWQ skips them too), shrink the group's
[min, max] by r ∈ {1, 0.975, …, 0.525} and keep, per (row, group), the r whose RTN result has the least
output error on that group's diagonal block of H. Clipped weights then go to RTN or GPTQ.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from qkiln.kernels.blas import one_blas_thread
from qkiln.model.config import LlamaConfig
from qkiln.model.names import GROUP_OF, INPUT_GROUPS, LINEARS
from qkiln.quantize.scheme import Scheme

log = logging.getLogger(__name__)

NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """What the searches need about one input group's calibration activations.

    h        (in, in) float64  2XᵀX/n
    abs_mean (in,)    float64  mean |x| per channel
    """

    h: np.ndarray
    abs_mean: np.ndarray

    def scaled(self, s: np.ndarray) -> GroupStats:
        """Statistics of x / s (the input after folding)."""
        inv = 1.0 / s.astype(np.float64)
        return GroupStats(h=self.h * inv[:, None] * inv[None, :], abs_mean=self.abs_mean * inv)


def rtn_dequant(w: np.ndarray, scheme: Scheme) -> np.ndarray:
    """RTN on `scheme`'s grid, dequantized (rows, cols) float32."""
    codes, params = scheme.quantize(w)
    return scheme.decode(codes, params)


def tie_heads(abs_mean: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """o_proj input statistic averaged over the query heads sharing a kv head, broadcast back (GQA)."""
    a = abs_mean.reshape(config.num_key_value_heads, config.n_rep, config.head_dim)
    return np.broadcast_to(a.mean(axis=1, keepdims=True), a.shape).reshape(-1).copy()


# Floats of candidate weights (candidates x rows x cols) searched in one product: bounds the search's
# temporaries (a few arrays of this size) while keeping the products large.
SEARCH_FLOATS = 1 << 23
SEARCH_WORKERS = 4  # threads of the scale search (`awq_layer`): its memory is per worker


def search_workers(threads: int | None = None) -> int:
    """How many threads `awq_layer`'s scale search runs on: `threads` (default: every core), at most
    SEARCH_WORKERS — each holds a job's stacked candidates (up to SEARCH_FLOATS floats, a few times over)."""
    return max(1, min(threads or os.cpu_count() or 1, SEARCH_WORKERS))


def candidate_scales(abs_mean: np.ndarray, n_grid: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas (n_grid,), s (n_grid, in) float32): s = mean|x|^α normalised so that sqrt(max·min) = 1,
    floored at 1e-4, for α = 0, 1/n_grid, ... — α = 0 is s = 1 (plain RTN)."""
    alphas = np.arange(n_grid) / n_grid
    s = np.power(np.maximum(abs_mean, 1e-8)[None, :], alphas[:, None])  # (n_grid, in) float64
    s = s / np.sqrt(s.max(axis=1, keepdims=True) * s.min(axis=1, keepdims=True))
    return alphas, np.maximum(s, 1e-4).astype(np.float32)


# Columns of the Cholesky factor per product in `candidate_losses`: the triangular product in blocks of this
# many costs (1 + 1/blocks)/2 of a dense one (0.54 at 1536 inputs, 0.61 at 576).
FACTOR_BLOCK = 128


def error_factor(h: np.ndarray) -> np.ndarray | None:
    """Lower-triangular L (in, in) float32 with L Lᵀ = H + δI, δ = 1e-7 · mean diag (a channel that is never
    active makes H singular; δ moves a loss by 1e-7 of ||E||²): tr(E H Eᵀ) = ||E L||², for half the
    multiply-adds when E L is formed block-triangularly. None when H is not numerically positive semidefinite."""
    h64 = np.asarray(h, np.float64)
    damp = 1e-7 * max(float(np.mean(np.diag(h64))), np.finfo(np.float64).tiny)
    try:
        return np.linalg.cholesky(h64 + damp * np.eye(len(h64))).astype(np.float32)
    except np.linalg.LinAlgError:
        return None


def _squared_norms(e: np.ndarray, factor: np.ndarray | None, h: np.ndarray, k: int) -> np.ndarray:
    """Per candidate (e holds k candidates' rows, stacked), Σ over its rows of e H eᵀ, (k,) float64: from the
    factor, column block by column block of E L (block J reads only E's columns ≥ J: L is lower triangular)."""
    if factor is None:
        return ((e @ h) * e).reshape(k, -1).sum(axis=1, dtype=np.float64)
    cols = e.shape[1]
    out = np.zeros(k, np.float64)
    for j0 in range(0, cols, FACTOR_BLOCK):
        j1 = min(cols, j0 + FACTOR_BLOCK)
        y = e[:, j0:] @ factor[j0:, j0:j1]  # (k * rows, j1 - j0)
        out += np.einsum("ij,ij->i", y, y, dtype=np.float64).reshape(k, -1).sum(axis=1)
    return out


def candidate_losses(w: np.ndarray, scheme: Scheme, s: np.ndarray, h: np.ndarray,
                     factor: np.ndarray | None = None) -> np.ndarray:
    """Output error (`quantize.gptq.output_error`, in float32) of RTN(W·diag(s_k))·diag(1/s_k) against W for
    every candidate s_k, (k,) float64: the candidates' weights stacked as rows of one matrix, one RTN and one
    product per chunk of candidates (rows are independent on every grid but a per-tensor one, which goes one
    at a time). `factor` (`error_factor(h)`) halves the product; without it E H is formed densely."""
    w = np.asarray(w, np.float32)
    rows, cols = w.shape
    step = 1 if scheme.per_tensor else max(1, SEARCH_FLOATS // w.size)
    out = np.empty(len(s), np.float64)
    for k0 in range(0, len(s), step):
        sk = s[k0 : k0 + step, None, :]  # (k, 1, in)
        w_hat = rtn_dequant((w[None] * sk).reshape(-1, cols), scheme).reshape(-1, rows, cols) / sk
        e = (w_hat - w[None]).reshape(-1, cols)  # (k * rows, in)
        out[k0 : k0 + step] = _squared_norms(e, factor, h, len(sk)) / 2.0
    return out


class ScaleSearch:
    """The scale search of one input group (`search_scale`), in two stages (the coarse candidates, then the fine
    ones around the best of those), each split into jobs a pool can run in any order: `jobs()` gives one job per
    (quantized linear, half of the stage's candidates), `take(results)` sums their losses over the linears in
    their order — the same bytes whatever ran the jobs, and when."""

    def __init__(self, weights: list[np.ndarray], schemes: list[Scheme | None], stats: GroupStats, *,
                 n_grid: int = 20, coarse: int = 4):
        self.linears = [(np.asarray(w, np.float32), sch) for w, sch in zip(weights, schemes, strict=True)
                        if sch is not None]
        self.alphas, self.s = candidate_scales(stats.abs_mean, n_grid)
        self.h = stats.h.astype(np.float32)
        self.factor = error_factor(stats.h)
        self.loss = np.full(n_grid, np.inf)
        if coarse < 1 or coarse & (coarse - 1):
            raise ValueError(f"the coarse step must be a power of two, got {coarse}")
        self.coarse = coarse
        self.stage = 0
        self._todo: list[int] = []
        self._parts: list[tuple[int, slice]] = []  # per job: its linear, its slice of _todo

    @property
    def done(self) -> bool:
        """Every stage run: the coarse grid (stage 0), then steps coarse/2, coarse/4, ..., 1 around the best."""
        return (self.coarse >> self.stage) == 0 if self.stage else False

    def jobs(self) -> list[tuple[int, Callable[[], np.ndarray]]]:
        """(cost, job) for each job of the next stage; job() -> its linear's losses on its candidates.

        Stage 0 scores every `coarse`-th α; stage k the two α at ± coarse/2^k from the best so far. For a loss
        unimodal in α the minimum is within coarse - 1 of the best coarse point, within step - 1 of the best
        after each halving step, so the last (step 1) finds it: 5 + 2 + 2 of the 20 candidates at coarse 4."""
        n = len(self.loss)
        if self.stage == 0:
            idx: list[int] = list(range(0, n, self.coarse))
        else:
            b, step = int(np.argmin(self.loss)), self.coarse >> self.stage
            idx = [b - step, b + step]
        self._todo = [i for i in idx if 0 <= i < n and np.isinf(self.loss[i])]
        half = (len(self._todo) + 1) // 2
        self._parts = [(k, part) for k in range(len(self.linears))
                       for part in (slice(0, half), slice(half, len(self._todo))) if part.start < part.stop]
        return [(self.linears[k][0].size * (part.stop - part.start), functools.partial(
            candidate_losses, *self.linears[k], self.s[self._todo[part]], self.h, self.factor)) for k, part in self._parts]

    def take(self, results: list[np.ndarray]) -> None:
        """The jobs' results, in `jobs()` order: the stage's losses, summed over the linears in their order."""
        per_linear = np.zeros((max(1, len(self.linears)), len(self._todo)), np.float64)
        for (k, part), got in zip(self._parts, results, strict=True):
            per_linear[k, part] = got
        total = per_linear[0].copy()
        for row in per_linear[1:]:
            total += row
        self.loss[self._todo] = total  # no quantized linear: folding is exact, no loss
        self.stage += 1

    def result(self) -> tuple[np.ndarray, float, float, float]:
        """(s, alpha, loss, loss at α = 0) of the best candidate scored (the first on ties)."""
        best = int(np.argmin(self.loss))
        return self.s[best], float(self.alphas[best]), float(self.loss[best]), float(self.loss[0])


def search_scale(
    weights: list[np.ndarray], schemes: list[Scheme | None], stats: GroupStats, *, n_grid: int = 20,
    coarse: int = 4,
) -> tuple[np.ndarray, float, float, float]:
    """Best per-channel scale for linears sharing one input: (s (in,) float32, alpha, loss, loss at α=0).

    α runs over the grid 0, 1/n_grid, ... (α = 0 is s = 1, plain RTN, so the result is never worse than RTN
    on this proxy). The search is coarse to fine (`ScaleSearch.jobs`): every `coarse`-th α first, then halving
    steps around the best — the grid's minimum whenever the loss is unimodal in α (it is a smooth trade
    between the salient and the other channels' error), for 9 of the 20 evaluations (coarse=1: all of them).
    Ties go to the smaller α. A linear whose scheme is None stays in float: folding is exact for it,
    so it adds no loss. (`awq_layer` runs the four groups' `ScaleSearch` jobs on a pool; this runs one here.)
    """
    with one_blas_thread():  # the same bytes as awq_layer's, whatever the caller's BLAS threads
        search = ScaleSearch(weights, schemes, stats, n_grid=n_grid, coarse=coarse)
        while not search.done:
            search.take([job() for _, job in search.jobs()])
    return search.result()


def search_clip(
    w: np.ndarray, scheme: Scheme, h: np.ndarray, *, n_grid: int = 20, max_shrink: float = 0.5
) -> np.ndarray:
    """`w` (rows, cols) with each (row, group)'s range shrunk by the ratio minimising its output error."""
    rows, cols = w.shape
    gs = scheme.group_cols or cols
    ng = cols // gs
    wg = w.reshape(rows, ng, gs)  # (rows, ng, gs)
    lo = np.minimum(wg.min(axis=-1, keepdims=True), 0)  # (rows, ng, 1)
    hi = np.maximum(wg.max(axis=-1, keepdims=True), 0)
    hb = np.stack([h[g * gs : (g + 1) * gs, g * gs : (g + 1) * gs] for g in range(ng)]).astype(np.float32)
    best_err = np.full((rows, ng), np.inf, dtype=np.float64)
    best_r = np.ones((rows, ng, 1), dtype=np.float32)
    for i in range(int(n_grid * max_shrink)):
        r = np.float32(1 - i / n_grid)
        wc = np.clip(wg, lo * r, hi * r).reshape(rows, cols)
        e = (rtn_dequant(wc, scheme) - w).reshape(rows, ng, gs)  # error against the ORIGINAL weights
        err = np.einsum("rgi,gij,rgj->rg", e, hb, e, optimize=True)  # (rows, ng)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_r[better] = r
    return np.clip(wg, lo * best_r, hi * best_r).reshape(rows, cols).astype(np.float32)


def fold_scales(
    tensors: dict[str, np.ndarray], scales: dict[str, np.ndarray], config: LlamaConfig
) -> dict[str, np.ndarray]:
    """Apply per-group input scales to one layer's tensors (short names like 'self_attn.q_proj' and
    'input_layernorm'), folding 1/s into the preceding op; returns new float32 arrays (inputs untouched).

    `scales` maps an INPUT_GROUPS key to s (in,); a missing key means s = 1. 'attn_out' must be tied
    per kv head (see `tie_heads`); that is checked.
    """
    out = {k: np.array(v, dtype=np.float32) for k, v in tensors.items()}
    if "attn_in" in scales:
        s = scales["attn_in"]
        out["input_layernorm"] = out["input_layernorm"] / s
        for n in INPUT_GROUPS["attn_in"]:
            out[n] = out[n] * s[None, :]
    if "attn_out" in scales:
        s = scales["attn_out"].reshape(config.num_key_value_heads, config.n_rep, config.head_dim)
        assert np.allclose(s, s[:, :1, :]), "attn_out scales must be tied per kv head"
        out["self_attn.v_proj"] = out["self_attn.v_proj"] / s[:, 0, :].reshape(-1)[:, None]
        out["self_attn.o_proj"] = out["self_attn.o_proj"] * scales["attn_out"][None, :]
    if "mlp_in" in scales:
        s = scales["mlp_in"]
        out["post_attention_layernorm"] = out["post_attention_layernorm"] / s
        for n in INPUT_GROUPS["mlp_in"]:
            out[n] = out[n] * s[None, :]
    if "mlp_out" in scales:
        s = scales["mlp_out"]
        out["mlp.up_proj"] = out["mlp.up_proj"] / s[:, None]
        out["mlp.down_proj"] = out["mlp.down_proj"] * s[None, :]
    return out


@dataclasses.dataclass
class AwqLayerResult:
    tensors: dict[str, np.ndarray]  # folded (and clipped) float32 weights and norms, short names
    stats: dict[str, GroupStats]  # statistics of each group's input AFTER folding (for GPTQ)
    info: dict[str, dict[str, float]]  # per group: alpha, loss, loss at alpha 0


def awq_layer(
    tensors: dict[str, np.ndarray],
    stats: dict[str, GroupStats],
    schemes: dict[str, Scheme | None],
    config: LlamaConfig,
    *,
    n_grid: int = 20,
    clip: bool = True,
    threads: int | None = None,
) -> AwqLayerResult:
    """Search and fold AWQ scales for one decoder layer (all searches on the original weights, as
    AutoAWQ does), then optionally search clipping on the folded weights."""
    # Every BLAS call on one thread (the factors' Cholesky, the candidates' products, the clip's contractions):
    # OpenBLAS's threaded potrf and syrk sum in an order that depends on the thread count, so the bytes would
    # depend on the machine (seen on an AVX2 host: a Ray worker, OMP_NUM_THREADS=1, gave other codes).
    with ThreadPoolExecutor(max_workers=search_workers(threads)) as pool, one_blas_thread():
        searches = {}
        for group, names in INPUT_GROUPS.items():
            st = stats[group]
            if group == "attn_out":
                st = GroupStats(h=st.h, abs_mean=tie_heads(st.abs_mean, config))
            searches[group] = ScaleSearch([tensors[n] for n in names], [schemes[n] for n in names], st, n_grid=n_grid)
        # The four groups' searches are independent: each stage's jobs of all groups go to one pool, the largest
        # first (down_proj's K-quant fits alone would otherwise keep one core busy while the other idles) — the
        # same arithmetic whatever the number of workers.
        while not all(srch.done for srch in searches.values()):  # the same stages for every group
            jobs = {g: srch.jobs() for g, srch in searches.items()}
            order = sorted(((cost, g, i) for g, js in jobs.items() for i, (cost, _) in enumerate(js)), reverse=True)
            futures = {(g, i): pool.submit(jobs[g][i][1]) for _, g, i in order}
            for g, srch in searches.items():
                srch.take([futures[(g, i)].result() for i in range(len(jobs[g]))])
        found = {g: srch.result() for g, srch in searches.items()}
        scales = {g: s for g, (s, _, _, _) in found.items()}
        info = {g: {"alpha": alpha, "loss": loss, "loss_rtn": loss0} for g, (_, alpha, loss, loss0) in found.items()}
        folded = fold_scales(tensors, scales, config)
        new_stats = {g: stats[g].scaled(scales[g]) for g in INPUT_GROUPS}
        if clip:  # one job per linear, the largest first
            todo = sorted((n for n in LINEARS if n not in NO_CLIP and schemes[n] is not None),
                          key=lambda n: -folded[n].size)
            clipped = {n: pool.submit(search_clip, folded[n], schemes[n], new_stats[GROUP_OF[n]].h, n_grid=n_grid)
                       for n in todo}
            folded.update({n: f.result() for n, f in clipped.items()})
    return AwqLayerResult(tensors=folded, stats=new_stats, info=info)
