from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from qkiln.formats.safetensors_write import write_safetensors


def test_the_safetensors_library_reads_back_every_dtype(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "b.f32": rng.normal(size=(3, 5)).astype(np.float32),
        "a.f16": rng.normal(size=(7,)).astype(np.float16),
        "c.i32": rng.integers(-9, 9, size=(2, 2, 2)).astype(np.int32),
        "d.u8": rng.integers(0, 255, size=(9,)).astype(np.uint8),
        "e.scalar": np.array(3.0, np.float32),
        "f.empty": np.zeros((0, 4), np.float32),
    }
    p = tmp_path / "x.safetensors"
    write_safetensors(p, tensors, metadata={"z": "1", "format": "pt", "a": "2"})
    back = load_file(p)
    assert sorted(back) == sorted(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_bf16_and_fp8_bits_survive(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch", reason="bf16/fp8 read back through torch")
    torch = pytest.importorskip("torch")
    x = np.linspace(-3, 3, 16, dtype=np.float32)
    p = tmp_path / "x.safetensors"
    write_safetensors(p, {"bf": x.astype(ml_dtypes.bfloat16), "f8": x.astype(ml_dtypes.float8_e4m3fn)})
    back = safetensors_torch.load_file(p)
    assert back["bf"].dtype == torch.bfloat16 and back["f8"].dtype == torch.float8_e4m3fn
    np.testing.assert_array_equal(back["bf"].view(torch.int16).numpy(), x.astype(ml_dtypes.bfloat16).view(np.int16))
    np.testing.assert_array_equal(back["f8"].view(torch.uint8).numpy(), x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_same_inputs_same_bytes_whatever_the_dict_order(tmp_path):
    a = {"x": np.ones(3, np.float32), "y": np.zeros(2, np.float16)}
    b = {"y": np.zeros(2, np.float16), "x": np.ones(3, np.float32)}
    write_safetensors(tmp_path / "a", a, {"k1": "v", "k2": "w", "k3": "u"})
    write_safetensors(tmp_path / "b", b, {"k3": "u", "k2": "w", "k1": "v"})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    header_len = int.from_bytes((tmp_path / "a").read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_lazy_tensor_is_produced_at_write_time_and_checked(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return np.arange(6, dtype=np.int32).reshape(2, 3)

    write_safetensors(tmp_path / "a", {"t": (np.int32, (2, 3), make)})
    assert calls == [1]
    np.testing.assert_array_equal(load_file(tmp_path / "a")["t"], np.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="declared"):
        write_safetensors(tmp_path / "b", {"t": (np.float32, (2, 3), make)})
