"""`LazyRows`: a checkpoint tensor read a block of rows at a time, the same values as reading it whole."""

import tracemalloc

import numpy as np
import pytest

from qkiln.formats.hf import Checkpoint
from qkiln.model.source import LazyRows, row_blocks
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rtn import quantize_rtn


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_rows_gathers_and_blocks_equal_the_whole_tensor(make_checkpoint, tiny_config, dtype):
    ckpt = Checkpoint.open(make_checkpoint(tiny_config(vocab_size=300), dtype=dtype))
    name = "model.embed_tokens.weight"
    whole = np.array(ckpt.tensor(name))
    lazy = ckpt.lazy(name)
    assert isinstance(lazy, LazyRows) and lazy.shape == whole.shape
    np.testing.assert_array_equal(lazy[17:203], whole[17:203])
    np.testing.assert_array_equal(lazy[290:400], whole[290:])  # clipped at the end, as a slice of an array
    idx = np.array([5, 0, 299, 5])
    np.testing.assert_array_equal(lazy[idx], whole[idx])
    np.testing.assert_array_equal(np.asarray(lazy), whole)
    cols = whole.shape[1]
    blocks = list(row_blocks(lazy, max_floats=7 * cols + 3))  # 7 rows a block
    assert [len(b) for b in blocks[:-1]] == [7] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    norm = ckpt.lazy("model.norm.weight")  # 1-D: read whole
    assert isinstance(norm, np.ndarray) and norm.shape == (whole.shape[1],)


def test_reading_rows_allocates_only_those_rows(make_checkpoint, tiny_config):
    cfg = tiny_config(vocab_size=16384, hidden_size=128, intermediate_size=256, num_attention_heads=4)
    lazy = Checkpoint.open(make_checkpoint(cfg, dtype="BF16", tokenizer=False)).lazy("model.embed_tokens.weight")
    one = 16384 * 128 * 4
    tracemalloc.start()
    try:
        rows = lazy[1000:1512]  # 1/32 of the tensor
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows.shape == (512, 128)
    assert peak < one / 16, (peak, one)


@pytest.mark.parametrize("scheme", ["q4_k", "q6_k", "q4_0", "int4_g32_asym", "fp8_e4m3fn_pc", "fp8_e4m3fn_pt"])
def test_rtn_of_lazy_rows_equals_rtn_of_the_array(make_checkpoint, tiny_config, scheme):
    ckpt = Checkpoint.open(make_checkpoint(tiny_config(vocab_size=300, hidden_size=256), dtype="BF16"))
    name = "model.embed_tokens.weight"
    sch = get_scheme(scheme)
    a = quantize_rtn(ckpt.tensor(name), sch, name=name, chunk_elems=4096)
    b = quantize_rtn(ckpt.lazy(name), sch, name=name, chunk_elems=4096)
    np.testing.assert_array_equal(a.codes, b.codes)
    assert a.params.keys() == b.params.keys()
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
