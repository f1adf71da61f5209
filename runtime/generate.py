"""Key/value cache and greedy decoding for the NumPy Llama runtime.

The prompt runs once through every layer (all tokens in one batched pass); each new token then runs
alone and attends to the cached keys/values, so a step costs one token's matmuls, not the whole prefix.
A model whose linears all run on packed kernels decodes each token in one C call (`fast_decode_step`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from qkiln.errors import UserError
from qkiln.kernels.decode import DecodeStep
from qkiln.model.config import LlamaConfig

if TYPE_CHECKING:
    from qkiln.runtime.llama import LlamaModel


class KVCache:
    """Per-layer rotated keys and values, preallocated for `max_len` positions of a batch of `batch` rows.

    `k[i]`, `v[i]` are (batch, kv_heads, max_len, head_dim) float32: a layer reads a prefix
    `[:, :, :t]` as one (batch, kv_heads, t, head_dim) operand without copying. `lengths[i]` counts the
    positions layer i has written; a layer call at `start_pos` may overwrite from any filled position
    (re-run a suffix) but may not leave a hole.
    """

    def __init__(self, config: LlamaConfig, max_len: int, batch: int = 1):
        assert max_len > 0 and batch > 0
        self.max_len = max_len
        self.batch = batch
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.num_hidden_layers)]
        self.lengths = [0] * config.num_hidden_layers

    @property
    def length(self) -> int:
        """Positions every layer has filled: where the next forward starts."""
        return min(self.lengths)

    def store(
        self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Write k, v (batch, kv_heads, s, head_dim) at start_pos; return the keys/values 0..start_pos+s-1 (views)."""
        b, _, s, _ = k.shape
        end = start_pos + s
        if b != self.batch:
            raise UserError(
                f"KV cache holds batch {self.batch}, the input has batch {b}; make a cache per batch size"
            )
        if start_pos > self.lengths[layer]:
            raise UserError(
                f"layer {layer}: start_pos {start_pos} skips positions (cache filled to {self.lengths[layer]})"
            )
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} positions, {end} needed; make a longer cache")
        self.k[layer][:, :, start_pos:end] = k
        self.v[layer][:, :, start_pos:end] = v
        self.lengths[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reset(self) -> None:
        self.lengths = [0] * len(self.lengths)


def _eos_set(model: LlamaModel, eos_ids: Iterable[int] | None) -> set[int]:
    if eos_ids is not None:
        return {int(t) for t in eos_ids}
    eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}


def generate_greedy(
    model: LlamaModel,
    ids: list[int] | np.ndarray,
    max_new_tokens: int,
    eos_ids: Iterable[int] | None = None,
) -> list[int]:
    """The new tokens (prompt excluded) chosen by argmax, stopping after an end token or max_new_tokens.

    `ids` is one prompt (1-D, or (1, s)). `eos_ids=None` stops on the config's eos_token_id(s); pass an
    empty set to always produce max_new_tokens. The end token, when reached, is the last item returned.
    """
    prompt = np.asarray(ids, dtype=np.int64).reshape(-1)  # (s,)
    if prompt.size == 0:
        raise UserError("generate: the prompt is empty; pass at least one token id (e.g. the BOS token)")
    if max_new_tokens <= 0:
        return []
    stop = _eos_set(model, eos_ids)
    cache = KVCache(model.config, prompt.size + max_new_tokens, batch=1)
    h = model.hidden(prompt[None, :], start_pos=0, cache=cache)  # (1, s, hidden)
    logits = model.head(h[:, -1:])[0, -1]  # (vocab,)
    step = fast_decode_step(model, cache)
    pos = prompt.size
    out: list[int] = []
    while True:
        token = int(np.argmax(logits))
        out.append(token)
        if token in stop or len(out) >= max_new_tokens:
            return out
        if step is not None:
            logits = step(token, pos)  # (vocab,): the whole token in one C call
        else:
            h = model.hidden(np.array([[token]], dtype=np.int64), start_pos=pos, cache=cache)  # (1, 1, hidden)
            logits = model.head(h)[0, -1]
        pos += 1


def fast_decode_step(model: LlamaModel, cache: KVCache):
    """The C decode step (qkiln.kernels.decode) when the model's linears are all packed, else None: single
    tokens then run in one C call each instead of `model.hidden` + `model.head` (the same float32 math in
    another summation order: logits agree up to int8 activation rounding flips, see qkiln/kernels/README.md)."""
    if not getattr(model, "_ops", None):  # dense model: nothing packed, keep the NumPy runtime
        return None
    return DecodeStep.for_model(model, cache)
