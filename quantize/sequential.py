"""One decoder layer calibrated in a single pass, input group by input group ("true sequential").

GPTQ needs, for each linear, the Hessian of the inputs it will really see. Within a layer those depend on
the linears before it: o_proj's input is attention over the QUANTIZED q/k/v, down_proj's is
silu(gate)·up of the QUANTIZED gate/up. So the layer runs forward over all calibration samples once,
stopping at each of the four input groups to quantize it before going on:

1. attn_in  x = norm(h)                          -> H -> quantize q, k, v
2. attn_out a = attention(q̂ x, k̂ x, v̂ x)          -> H -> quantize o       (a kept for step 3)
3. mlp_in   h += ô a;  x = norm(h)               -> H -> quantize gate, up
4. mlp_out  m = silu(ĝ x) · (û x)                 -> H -> quantize down    (m kept for step 5)
5.          h += d̂ m                             -> the next layer's input

Every product goes through a `quantize.matmul` engine (float32 or bfloat16). One forward over the
calibration tokens in all, where "statistics pass with the original weights, then a second pass with the
quantized ones" costs two — the linears' products are most of calibration's time.

Memory (besides one layer's weights): h updated in place (N·L·hidden·4 B), the normalized h of steps 1
and 3 kept for steps 2 and 4 (N·L·hidden·2 B), the attention output between steps 2 and 3
(N·L·heads·d·4 B) and the MLP activation between steps 4 and 5 (N·L·inter·2 B) — the normalized h and the
activation in the engine's activation dtype, bfloat16 for the bfloat16 engine, whose products would round
them to that anyway (same bits, half the bytes). The last two never live at once, so they share one
buffer; for the demo model at 128 x 512 that is h + norm(h) + the larger of the two = 151 + 75 + 201 MB
(plus two batches' temporaries). The buffers live in a `LayerBuffers` the caller keeps from layer to
layer: fresh arrays of that size cost every layer ~0.2 s of page faults.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from qkiln.kernels.bf16 import aligned_empty
from qkiln.kernels.blas import one_blas_thread
from qkiln.kernels.elementwise import rms_norm, widen
from qkiln.model.config import LlamaConfig
from qkiln.quantize.hessian import mean_hessian
from qkiln.quantize.matmul import GramSum, Matmul
from qkiln.runtime.llama import rope_attention
from qkiln.runtime.rope import RopeTable

# Running Gram sums per input group (`each`): a fixed number, so the Hessian's bytes do not depend on the
# worker count; each lane's sum is written out once per group (4 (k, k) results where one per batch made 16
# at 128 samples), and a batch waits for its lane's previous batch only when that one is still running.
# Wide inputs get fewer: the lanes of a group share LANE_BYTES (an 8B model's down_proj input, 14336 wide,
# has one float32 (k, k) sum of 822 MB, not four).
SUM_LANES = 4
LANE_BYTES = 512 * 2**20


def sum_lanes(k: int) -> int:
    """Running Gram sums for an input group k wide (a function of the shape only: same bytes on any machine)."""
    return max(1, min(SUM_LANES, LANE_BYTES // (4 * k * k)))


def _aligned(floats: int) -> np.ndarray:
    """A flat float32 array starting on a 64-byte boundary (the AMX kernels stream aligned output rows)."""
    return aligned_empty((1, floats)).reshape(floats)


class LayerBuffers:
    """The activation arrays, reused by every layer of one calibration run (same shapes), and per-batch
    scratch (the products' outputs), lent to one worker at a time: fresh arrays of these sizes are
    page-faulted and zeroed by the kernel on every use."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._free: dict[str, list[np.ndarray]] = {}
        self._lent: dict[int, np.ndarray] = {}  # data address -> the flat array lent out
        self._lock = threading.Lock()

    def get(self, name: str, floats: int) -> np.ndarray:
        """A float32 buffer of at least `floats` elements, flat; its contents are whatever was left."""
        a = self._arrays.get(name)
        if a is None or a.size < floats:
            self._arrays[name] = a = _aligned(floats)
        return a[:floats]

    def take(self, name: str, shape: tuple[int, int]) -> np.ndarray:
        """A (rows, cols) float32 scratch array (contents undefined), until `give` returns it."""
        floats = shape[0] * shape[1]
        with self._lock:
            free = self._free.setdefault(name, [])
            a = free.pop() if free else None
        if a is None or a.size < floats:
            a = _aligned(floats)
        view = a[:floats].reshape(shape)
        with self._lock:
            self._lent[view.ctypes.data] = a
        return view

    def give(self, name: str, view: np.ndarray) -> None:
        """Return an array `take` lent, for the next taker."""
        with self._lock:
            self._free.setdefault(name, []).append(self._lent.pop(view.ctypes.data))

    def drop(self, name: str) -> None:
        """Free the scratch arrays of `name` no longer lent (the next `take` allocates afresh)."""
        with self._lock:
            self._free.pop(name, None)

    @contextlib.contextmanager
    def borrow(self, name: str, shape: tuple[int, int]) -> Iterator[np.ndarray]:
        """`take` for the duration of the block."""
        a = self.take(name, shape)
        try:
            yield a
        finally:
            self.give(name, a)


# (group name, its Hessian (in, in) float32 — the callee's to overwrite — or None when not asked) -> the group's linears, dequantized
# (out, in) float32 by short name ("self_attn.q_proj", ...): what the rest of the layer runs on.
QuantizeGroup = Callable[[str, np.ndarray | None], dict[str, np.ndarray]]


def run_layer(
    h: np.ndarray,
    norms: dict[str, np.ndarray],
    config: LlamaConfig,
    rope: RopeTable,
    quantize_group: QuantizeGroup,
    engine: Matmul,
    *,
    batch_samples: int = 8,
    need_hessian: bool = True,
    threads: int | None = None,
    buffers: LayerBuffers | None = None,
    abs_means: dict[str, np.ndarray] | None = None,
    statistics_only: bool = False,
) -> np.ndarray:
    """Calibrate and quantize one layer over hidden states h (N, L, hidden) float32; returns the layer's
    output, written into h (the input is consumed).

    `norms` holds "input_layernorm" and "post_attention_layernorm" (hidden,) float32 (AWQ-folded ones
    when AWQ ran). `quantize_group` is called once per group, in order; with need_hessian=False it
    gets None and no Hessian is computed (RTN after AWQ needs only the forward). `buffers` keeps the
    activation arrays for the next layer (a fresh set when not given).

    AWQ's statistics pass: `abs_means` (a dict) receives each group's mean |x| per input channel (in,)
    float64 beside its Hessian, and `statistics_only` leaves h as it was and skips the layer's last product
    (down_proj: its output is no group's input); the residual of step 3 goes to a per-batch scratch array
    instead of h. Returns h, unchanged, then.
    """
    if statistics_only and not need_hessian:
        raise ValueError("a statistics pass computes the Hessians: need_hessian must stay True")
    n, seq, _ = h.shape
    eps = config.rms_norm_eps
    q_out, kv_out = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    widths = {"attn_in": h.shape[-1], "attn_out": q_out, "mlp_in": h.shape[-1], "mlp_out": inter}  # inputs
    batches = [slice(b0, min(n, b0 + batch_samples)) for b0 in range(0, n, batch_samples)]
    norm_attn, norm_mlp = norms["input_layernorm"], norms["post_attention_layernorm"]
    buffers = buffers if buffers is not None else LayerBuffers()
    adt = engine.activation_dtype  # norm(h) of steps 1, 3 and the MLP activation only feed products

    def floats(count: int, dtype: np.dtype) -> int:
        return -(-count * dtype.itemsize // 4)  # float32 elements holding `count` of dtype

    normed_buf = (buffers.get("normed", floats(h.size, adt)).view(adt)[: h.size].reshape(h.shape)
                  if need_hessian else None)
    # the attention output (2-3, float32), then the activation (4-5, adt)
    wide = buffers.get("wide", max(n * seq * q_out, floats(n * seq * inter, adt)))

    def tokens(a: np.ndarray, sl: slice) -> np.ndarray:
        return a[sl].reshape(-1, a.shape[-1])  # (b * L, features) view

    def n_tokens(sl: slice) -> int:
        return (sl.stop - sl.start) * seq

    def gram(x: np.ndarray) -> np.ndarray | None:
        """What the batch's Hessian is summed over: x itself (a view that outlives the batch), or None."""
        return x if need_hessian else None

    # Batches run on `threads` workers, each product single-threaded: NumPy's element-wise work
    # (norms, RoPE, softmax, SiLU) is single-threaded, and a layer is as much of that as of products.
    # Workers take batches as they come free (the host steals time from one vCPU or the other: a fixed
    # split left one waiting ~0.7 s a layer). The Grams go to SUM_LANES running sums, batch b to lane
    # b % SUM_LANES after the lane's previous batch: the bytes depend on neither the worker count nor the
    # order in which batches finish.
    workers = max(1, min(threads or os.cpu_count() or 1, len(batches)))
    with ThreadPoolExecutor(max_workers=workers) as pool, one_blas_thread(), engine.threads(1):

        def each(fn: Callable[[slice], np.ndarray | None], group: str | None = None) -> np.ndarray | None:
            """fn over every batch; the Hessian of the arrays it returned (the lanes' sums merged in lane
            order), or None. With `abs_means`, also their mean |x| per column, into abs_means[group]
            (each batch's float32 column sums added in batch order: the same bytes whatever the workers)."""
            sums: list[GramSum | None] = [None] * SUM_LANES
            col_abs: list[np.ndarray | None] = [None] * len(batches)
            turn = [0] * SUM_LANES  # per lane, how many of its batches have been added
            n_lanes = sum_lanes(widths[group]) if group is not None else SUM_LANES
            failed = [False]  # a batch raised: nobody waits any more (the error reaches the caller)
            added = threading.Condition()

            def run(b: int) -> None:
                lane, k = b % n_lanes, b // n_lanes
                try:
                    x = fn(batches[b])
                    if x is not None and abs_means is not None and group is not None:
                        col_abs[b] = np.abs(widen(x)).sum(axis=0)
                    with added:  # batches start in order, so the one waited for is already running
                        added.wait_for(lambda: turn[lane] == k or failed[0])
                    if x is not None and not failed[0]:  # the lane's turn is ours alone until passed on
                        got = sums[lane]
                        if got is None:
                            sums[lane] = got = engine.gram_sum(x.shape[1])
                        got.add(x)
                except BaseException:
                    failed[0] = True
                    raise
                finally:
                    with added:
                        turn[lane] += 1
                        added.notify_all()

            for _ in pool.map(run, range(len(batches))):
                pass
            if abs_means is not None and group is not None and col_abs[0] is not None:
                total = np.zeros(col_abs[0].shape, np.float64)
                for c in col_abs:
                    assert c is not None  # every batch returned an array when the first did
                    total += c
                abs_means[group] = total / (n * seq)
            lanes = [lane_sum for lane_sum in sums if lane_sum is not None]
            if not lanes:
                return None
            for lane_sum in lanes[1:]:  # in lane order, in the sums' own layout: one (k, k) result
                lanes[0].merge(lane_sum)
            return mean_hessian(lanes[0].result(), lanes[0].tokens)  # float32, in the sum's own buffer

        live: dict[str, Any] = {}  # packed weights and stored activations, dropped when no longer needed

        def normed(sl: slice, weight: np.ndarray) -> np.ndarray:
            """The batch's normalized hidden states: kept from the Hessian pass when it ran."""
            x = live.get("x")
            return tokens(x, sl) if x is not None else rms_norm(tokens(h, sl), weight, eps)

        def keep_normed(sl: slice, weight: np.ndarray, hidden: np.ndarray | None = None) -> np.ndarray | None:
            """norm of the batch's hidden states (`hidden`, (t, hidden), or h's rows) into live["x"]."""
            src = tokens(h, sl) if hidden is None else hidden
            x = rms_norm(src, weight, eps, out=tokens(live["x"], sl))
            return gram(x)

        # 1. attn_in
        if need_hessian:
            live["x"] = normed_buf  # norm(h), reused by step 2
        w = quantize_group("attn_in", each(lambda sl: keep_normed(sl, norm_attn), "attn_in") if need_hessian else None)
        live["qkv"] = engine.pack(np.concatenate([w["self_attn.q_proj"], w["self_attn.k_proj"], w["self_attn.v_proj"]]))
        del w  # the dequantized copies: the packed ones are what runs

        # 2. attn_out: attention over the quantized q/k/v
        live["attn"] = wide[: n * seq * q_out].reshape(n, seq, q_out)  # o_proj's input, all samples

        def attn_out(sl: slice) -> np.ndarray | None:
            x = normed(sl, norm_attn)
            with buffers.borrow("qkv", (x.shape[0], q_out + 2 * kv_out)) as qkv:  # (t, q + 2 kv)
                engine.linear(x, live["qkv"], out=qkv)
                a = rope_attention(qkv[:, :q_out], qkv[:, q_out : q_out + kv_out], qkv[:, q_out + kv_out :],
                                   config, rope, sl.stop - sl.start, threads=1, out=tokens(live["attn"], sl),
                                   precision=engine.name)
            return gram(a)  # a: (t, q_out)

        hess = each(attn_out, "attn_out")
        del live["qkv"]
        buffers.drop("qkv")  # the workers' q/k/v products: 200 MB at 8B, not needed again this layer
        live["o"] = engine.pack(quantize_group("attn_out", hess)["self_attn.o_proj"])
        del hess
        live.pop("x", None)

        # 3. residual, then mlp_in
        def mlp_in(sl: slice) -> np.ndarray | None:
            if statistics_only:  # h + o(a) in a scratch array: h stays the layer's input
                with buffers.borrow("residual", (n_tokens(sl), h.shape[-1])) as r:
                    np.copyto(r, tokens(h, sl))
                    return keep_normed(sl, norm_mlp, engine.linear_add(tokens(live["attn"], sl), live["o"], r))
            engine.linear_add(tokens(live["attn"], sl), live["o"], tokens(h, sl))  # h += o(a), in place
            return keep_normed(sl, norm_mlp) if need_hessian else None

        if need_hessian:
            live["x"] = normed_buf  # norm(h), reused by step 4
        w = quantize_group("mlp_in", each(mlp_in, "mlp_in"))
        del live["attn"], live["o"]
        live["gate_up"] = engine.pack_glu(w["mlp.gate_proj"], w["mlp.up_proj"])
        del w  # 470 MB at 8B, for the whole mlp_out step otherwise

        # 4. mlp_out: the activation of the quantized gate/up
        # down_proj's input, all samples (attn is dead), in the engine's activation dtype (bfloat16: half the bytes)
        act = wide.view(adt)[: n * seq * inter].reshape(n, seq, inter)

        def mlp_out(sl: slice) -> np.ndarray | None:
            m = engine.glu(normed(sl, norm_mlp), live["gate_up"], out=tokens(act, sl))  # (t, inter)
            return gram(m)

        hess = each(mlp_out, "mlp_out")
        del live["gate_up"]  # before down_proj's GPTQ, the layer's largest: the packed gate/up are done
        down = quantize_group("mlp_out", hess)["mlp.down_proj"]
        del hess
        live.pop("x", None)
        if statistics_only:
            return h
        w_down = engine.pack(down)

        # 5. the layer's output
        def output(sl: slice) -> None:
            engine.linear_add(tokens(act, sl), w_down, tokens(h, sl))  # h += down(m), in place

        each(output)
    return h
