"""qkiln's llama.cpp grids against gguf-py, the reference block (de)quantizer."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="gguf-py is the reference for ggml block layouts")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

from qkiln.quantize.ggml_pack import GGML_TYPES, pack_blocks  # noqa: E402
from qkiln.quantize.registry import get_scheme  # noqa: E402
from qkiln.quantize.rtn import quantize_rtn  # noqa: E402

LEGACY = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the awkward blocks: zeros, constants, ties in |max|, tiny, mixed scales."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)  # (rows, cols)
    w[0, :32] = 0
    w[1, :32] = 3.0
    w[2, :32] = -2.5
    w[3, :32] = 1e-30
    w[4, :32] = rng.standard_normal(32) * 1e-6
    w[5, 0], w[5, 1] = 2.0, -2.0  # equal magnitudes: ggml keeps the first
    w[6] *= 100.0
    w[7, :32] = np.linspace(-1, 1, 32)  # exact .5 ties after scaling
    return w


def _qtype(name: str):
    return getattr(gguf.GGMLQuantizationType, GGML_TYPES[name][0])


@pytest.mark.parametrize("name", LEGACY)
def test_rtn_bytes_equal_gguf_quantize(name: str) -> None:
    w = _weights(48, 512)
    qt = quantize_rtn(w, get_scheme(name), name="blk.0.w")
    ours = pack_blocks(qt)
    ref = gguf_quantize(w, _qtype(name))
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref), f"{name}: {np.argwhere(ours != ref)[:5]}"


@pytest.mark.parametrize("name", LEGACY)
def test_gguf_dequantize_of_packed_equals_ours(name: str) -> None:
    w = _weights(16, 256, seed=1)
    qt = quantize_rtn(w, get_scheme(name))
    ref = gguf_dequantize(pack_blocks(qt), _qtype(name))
    assert np.array_equal(ref, qt.dequantize())
