"""A prompt through the runtime in one pass (every product batched over its tokens) gives the logits of the same
prompt fed one token at a time through the KV cache (every product one activation row): the integer sums are the
same, the float sums run in another order, so logits agree to float32 rounding until an int8 activation rounds
the other way — as the C decode step's do (tests/kernels/test_decode.py)."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.formats.gguf_model import load_gguf_model
from qkiln.kernels import api
from qkiln.runtime.generate import KVCache

Q4_0 = {"attn_q": "Q4_0", "attn_k": "Q4_0", "attn_v": "Q4_0", "attn_output": "Q4_0", "ffn_gate": "Q4_0",
        "ffn_up": "Q4_0", "ffn_down": "Q4_0", "token_embd": "Q8_0", "output": "Q8_0"}
Q8_0 = dict.fromkeys(Q4_0, "Q8_0")
Q5_0 = {**dict.fromkeys(Q4_0, "Q5_0"), "token_embd": "Q8_0", "output": "Q8_0"}
K_MIX = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q5_0", "ffn_gate": "Q5_0",
         "ffn_up": "Q5_0", "ffn_down": "Q6_K", "token_embd": "Q5_0", "output": "Q5_0"}  # as Q4_K_M on 576-wide rows
K_MIX2 = {**K_MIX, "ffn_down": "Q4_K", "attn_output": "Q4_1", "ffn_up": "Q5_1"}

pytestmark = pytest.mark.skipif("numpy" == api.kernel_path(), reason="batched products are C (QKILN_KERNEL=numpy)")


@pytest.mark.parametrize("types", [Q4_0, Q8_0, Q5_0, K_MIX, K_MIX2],
                         ids=["q4_0", "q8_0", "q5_0", "q5_0-q6_k-q8_0", "q4_k-q4_1-q5_1"])
def test_prompt_logits_equal_the_per_token_path(make_gguf, types):
    model = load_gguf_model(make_gguf(types=types, hidden=256, intermediate=512, n_layers=3)).model
    rng = np.random.default_rng(0)
    ids = rng.integers(3, model.config.vocab_size, 19)  # more than two 8-token tiles, not a multiple of 8
    whole = model.forward(ids[None], cache=KVCache(model.config, ids.size))[0]  # (s, vocab): batched products
    cache = KVCache(model.config, ids.size)
    one = np.stack([model.forward(ids[None, t : t + 1], start_pos=t, cache=cache)[0, 0] for t in range(ids.size)])
    if api.kernel_path() == "avx512" and types in (Q4_0, Q8_0, Q5_0):
        # the Q4_0X8/Q8_0X8/Q5_0X8 panels combine each block in the per-row kernels' order: the same bits
        np.testing.assert_array_equal(whole, one)
    scale = float(np.abs(one).max())
    # first token: one row either way, the same int8 activations through 3 layers -> float32 rounding only
    np.testing.assert_allclose(whole[0], one[0], rtol=0, atol=1e-4 * scale)
    # later tokens: an int8 activation may round the other way (~1% of the logits' range, as the decode step)
    assert np.abs(whole - one).max() <= 0.02 * scale
    assert (whole.argmax(-1) == one.argmax(-1)).mean() >= 0.9
