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


KQUANTS = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]
# byte offsets of the fp16 fields in one block
FP16_FIELDS = {
    "q4_1": (0, 2),
    "q5_1": (0, 2),
    "q4_k": (0, 2),
    "q5_k": (0, 2),
    "q6_k": (208,),
    "q2_k": (80, 82),
    "q3_k": (108,),
}


@pytest.mark.parametrize("name", KQUANTS)
def test_kquant_packed_bytes_dequantize_like_ours(name: str) -> None:
    """gguf-py cannot quantize K-quants, but its dequantizer reads our packed blocks to our exact values."""
    w = _weights(16, 768, seed=2)
    w[8, :256] = 0  # a whole zero super-block
    w[9, :256] = 1e-30
    qt = quantize_rtn(w, get_scheme(name))
    packed = pack_blocks(qt)
    assert packed.shape == (16, 3 * GGML_TYPES[name][2])
    assert np.array_equal(gguf_dequantize(packed, _qtype(name)), qt.dequantize())


@pytest.mark.parametrize("name", KQUANTS)
def test_pack_blocks_layout_round_trip(name: str) -> None:
    """Every code and sub-scale lands where ggml reads it: random codes and params survive gguf-py's decoder."""
    rng = np.random.default_rng(5)
    scheme = get_scheme(name)
    rows, cols = 3, 512
    lo, hi = scheme.code_range
    codes = rng.integers(lo, hi + 1, (rows, cols)).astype(np.uint8)
    nsb = cols // 256
    d = rng.uniform(0.01, 1, (rows, nsb)).astype(np.float16)
    if name == "q6_k":
        params = {"d": d, "scales": rng.integers(-128, 128, (rows, nsb * 16)).astype(np.int8)}
    elif name == "q3_k":
        params = {"d": d, "scales": rng.integers(-32, 32, (rows, nsb * 16)).astype(np.int8)}
    elif name == "q2_k":
        params = {
            "d": d,
            "dmin": rng.uniform(0.01, 1, (rows, nsb)).astype(np.float16),
            "scales": rng.integers(0, 16, (rows, nsb * 16)).astype(np.uint8),
            "mins": rng.integers(0, 16, (rows, nsb * 16)).astype(np.uint8),
        }
    else:
        params = {
            "d": d,
            "dmin": rng.uniform(0.01, 1, (rows, nsb)).astype(np.float16),
            "scales": rng.integers(0, 64, (rows, nsb * 8)).astype(np.uint8),
            "mins": rng.integers(0, 64, (rows, nsb * 8)).astype(np.uint8),
        }
    from qkiln.quantize.tensor import QuantizedTensor

    qt = QuantizedTensor(scheme, codes, params)
    assert np.array_equal(gguf_dequantize(pack_blocks(qt), _qtype(name)), qt.dequantize())


def _llamacpp_ref(name: str, w: np.ndarray) -> np.ndarray:
    """Blocks from llama.cpp's own `quantize_row_<type>_ref` (libggml-base from llama-cpp-python)."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python ships the ggml reference quantizers"
    )
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = getattr(lib, f"quantize_row_{GGML_TYPES[name][0].lower().replace('_k', '_K')}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    rows, cols = w.shape
    out = np.zeros((rows, cols // GGML_TYPES[name][1] * GGML_TYPES[name][2]), np.uint8)
    fn(w.ctypes.data, out.ctypes.data, w.size)
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LEGACY)
def test_legacy_bytes_equal_llamacpp_reference(name: str) -> None:
    w = np.ascontiguousarray(_weights(32, 512, seed=3))
    assert np.array_equal(pack_blocks(quantize_rtn(w, get_scheme(name))), _llamacpp_ref(name, w))


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", KQUANTS)
def test_kquants_bytes_equal_llamacpp_reference(name: str) -> None:
    """Same float32 operations in the same order as ggml's reference search: identical bytes."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 1024)).astype(np.float32)
    w[:32] *= rng.uniform(0.001, 100, (32, 1)).astype(np.float32)
    w[32:64] = rng.laplace(size=(32, 1024)).astype(np.float32)
    w[64:72] = _weights(8, 1024, seed=9)[:8]  # zeros, constants, tiny, ties
    w[72, :256] = 0
    w[73, :256] = 1e-30
    w[74, :256] = 7.0
    w[75, :256] = np.where(np.arange(256) % 2, 1.0, -1.0)
    w[76] = rng.lognormal(0, 2, 1024) * rng.choice([-1.0, 1.0], 1024)
    w[77, ::3] = 0.0
    ours = pack_blocks(quantize_rtn(w, get_scheme(name)))
    ref = _llamacpp_ref(name, w)
    size = GGML_TYPES[name][2]
    differ = np.flatnonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1))
    assert differ.size == 0, f"{differ.size} blocks differ, first {differ[:5]}"


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", LEGACY + KQUANTS)
def test_random_matrices_bytes_equal_llamacpp(name: str) -> None:
    from hypothesis import given
    from hypothesis import strategies as st

    block = GGML_TYPES[name][1]

    @given(
        st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**32 - 1), st.sampled_from([1e-6, 1.0, 50.0])
    )
    def prop(rows: int, nb: int, seed: int, mag: float) -> None:
        rng = np.random.default_rng(seed)
        w = (rng.standard_normal((rows, nb * block)) * rng.lognormal(0, 1, (rows, 1)) * mag).astype(
            np.float32
        )
        assert np.array_equal(pack_blocks(quantize_rtn(w, get_scheme(name))), _llamacpp_ref(name, w))

    prop()


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_unpack_is_the_exact_inverse_of_pack(name: str) -> None:
    """Any block bytes (random, so every bit of every field is exercised) survive unpack -> pack, and
    gguf-py decodes them to what our QuantizedTensor decodes."""
    from hypothesis import given
    from hypothesis import strategies as st

    from qkiln.quantize.ggml_pack import unpack_blocks

    _, block, size = GGML_TYPES[name]

    @given(st.integers(1, 3), st.integers(1, 2), st.integers(0, 2**32 - 1))
    def prop(rows: int, nb: int, seed: int) -> None:
        raw = np.random.default_rng(seed).integers(0, 256, (rows, nb * size), dtype=np.uint8)
        # keep fp16 fields finite (a NaN d decodes to NaN on both sides, but NaN != NaN)
        raw = raw.reshape(rows, nb, size)
        for lo in FP16_FIELDS.get(name, (0,)):
            raw[..., lo + 1] &= 0x7B  # exponent < 31: finite
        raw = raw.reshape(rows, nb * size)
        qt = unpack_blocks(raw, name, (rows, nb * block))
        assert np.array_equal(pack_blocks(qt), raw)
        assert np.array_equal(gguf_dequantize(raw, _qtype(name)), qt.dequantize())

    prop()


def test_unpack_rejects_wrong_sizes() -> None:
    from qkiln.errors import QuantizeError
    from qkiln.quantize.ggml_pack import unpack_blocks

    with pytest.raises(QuantizeError, match="expected 36"):
        unpack_blocks(np.zeros(35, np.uint8), "q4_0", (2, 32), name="blk.0.attn_q.weight")
    with pytest.raises(QuantizeError, match="not a multiple"):
        unpack_blocks(np.zeros(18, np.uint8), "q4_0", (1, 48))
    with pytest.raises(QuantizeError, match="no ggml block type"):
        unpack_blocks(np.zeros(18, np.uint8), "int4_g32", (1, 32))


@pytest.mark.parametrize("name", list(GGML_TYPES))
def test_nbytes_is_the_packed_size(name: str) -> None:
    qt = quantize_rtn(_weights(8, 512), get_scheme(name))
    assert qt.nbytes == pack_blocks(qt).nbytes
    assert qt.bits_per_weight == {"q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0}.get(
        name, {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}.get(name)
    )


IMATRIX_TYPES = ["q4_0", "q5_0", "q4_1", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


def _llamacpp_chunk(name: str, w: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """llama.cpp's `ggml_quantize_chunk` with an imatrix (what `llama-quantize --imatrix` runs)."""
    import ctypes
    import os

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python ships libggml")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    fn.restype = ctypes.c_size_t
    rows, cols = w.shape
    out = np.zeros((rows, cols // GGML_TYPES[name][1] * GGML_TYPES[name][2]), np.uint8)
    imp = np.ascontiguousarray(importance, np.float32)
    fn(int(_qtype(name)), w.ctypes.data, out.ctypes.data, 0, rows, cols, imp.ctypes.data)
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_importance_bytes_equal_llamacpp_imatrix(name: str) -> None:
    rng = np.random.default_rng(6)
    w = np.ascontiguousarray(_weights(40, 512, seed=6))
    importance = rng.lognormal(0, 1, 512).astype(np.float32)
    importance[:32] = 0  # a block nobody reads
    w[3, :256] = 0  # and a zero super-block
    ours = pack_blocks(quantize_rtn(w, get_scheme(name), importance=importance))
    assert np.array_equal(ours, _llamacpp_chunk(name, w, importance))


@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_importance_lowers_the_weighted_error(name: str) -> None:
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    importance = rng.lognormal(0, 1.5, 512).astype(np.float32)
    plain = quantize_rtn(w, get_scheme(name)).dequantize()
    weighted = quantize_rtn(w, get_scheme(name), importance=importance).dequantize()
    err = lambda d: float((((d - w) ** 2) * importance).mean())  # noqa: E731
    assert err(weighted) < 0.9 * err(plain)


@pytest.mark.parametrize("name", IMATRIX_TYPES)
def test_importance_of_wrong_length_is_an_error(name: str) -> None:
    from qkiln.errors import QuantizeError

    with pytest.raises(QuantizeError, match=r"^t: importance has shape \(3,\), expected \(256,\)"):
        quantize_rtn(
            np.ones((2, 256), np.float32), get_scheme(name), name="t", importance=np.ones(3, np.float32)
        )
