"""The GPTQ layout, checked by an unpacker written from the layout's documentation (AutoGPTQ/GPTQModel's
`QuantLinear.pack` and vLLM's `gptq` weight loader), element by element, independent of qkiln's packer."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from qkiln.errors import QuantizeError
from qkiln.formats.gptq_write import marlin_blockers
from qkiln.formats.gpu_safetensors_read import QuantizedFolder
from qkiln.formats.hf import Checkpoint
from qkiln.pipeline.gpu import convert_to_gpu, plan_schemes
from qkiln.pipeline.stream import layer_ordered, weight_stream
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.tensor import QuantizedTensor


def documented_dequant(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray,
                       bits: int, v1: bool) -> np.ndarray:
    """The layout as documented, one element at a time (tiny tensors only):
    qweight[i // (32/bits), j] >> (bits · (i % (32/bits))) & mask is the code of input i, output j;
    qzeros[g, j // (32/bits)] >> (bits · (j % (32/bits))) & mask is zero (v1: zero − 1) of group g, output j;
    W[j, i] = scales[g_idx[i], j] · (code − zero)."""
    per = 32 // bits
    mask = (1 << bits) - 1
    n_in, n_out = qweight.shape[0] * per, scales.shape[1]
    w = np.zeros((n_out, n_in), np.float32)
    for i in range(n_in):
        g = int(g_idx[i])
        for j in range(n_out):
            q = (int(qweight[i // per, j]) & 0xFFFFFFFF) >> (bits * (i % per)) & mask
            z = (int(qzeros[g, j // per]) & 0xFFFFFFFF) >> (bits * (j % per)) & mask
            z = z + 1 if v1 else z
            w[j, i] = np.float32(scales[g, j]) * np.float32(q - z)
    return w


def _convert(make_checkpoint, tiny_config, tmp_path: Path, scheme: str, algo: str = "rtn"):
    src = make_checkpoint(tiny_config(), name=f"src-{scheme}")
    calib = []
    if algo != "rtn":
        calib = [tmp_path / "calib.txt"]
        calib[0].write_text("Quantize the tensor block by block, group by group, with a scale. " * 60)
    out = tmp_path / f"gptq-{scheme}-{algo}"
    result = convert_to_gpu(src, out, "gptq", scheme, algorithm=algo, calib=calib, samples=4, seq_len=32)
    ckpt = Checkpoint.open(src)
    schemes, _ = plan_schemes(ckpt, scheme, "gptq")
    weights = dict(layer_ordered(weight_stream(ckpt, {n: s.name for n, s in schemes.items()}, algo, calib, samples=4, seq_len=32),
                                 ckpt.config))
    return out, weights, result


@pytest.mark.parametrize(("scheme", "algo"), [("int4_g32", "gptq"), ("int4_g64_asym", "rtn"), ("int4_pc", "rtn"),
                                              ("int8", "rtn")])
def test_documented_unpacking_equals_dequantize(make_checkpoint, tiny_config, tmp_path: Path, scheme: str, algo: str) -> None:
    from safetensors.numpy import load_file

    out, weights, _ = _convert(make_checkpoint, tiny_config, tmp_path, scheme, algo)
    grid = get_scheme(scheme)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc == json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("bits", "group_size", "desc_act", "sym", "quant_method", "checkpoint_format", "pack_dtype")} == {
        "bits": grid.bits, "group_size": grid.group or -1, "desc_act": False, "sym": grid.symmetric,
        "quant_method": "gptq", "checkpoint_format": "gptq" if grid.symmetric else "gptq_v2", "pack_dtype": "int32"}
    stored: dict[str, np.ndarray] = {}
    for f in out.glob("*.safetensors"):
        stored.update(load_file(f))
    n = 0
    for name, qt in weights.items():
        if not isinstance(qt, QuantizedTensor):
            assert stored[name].dtype == np.float16
            continue
        m = name.removesuffix(".weight")
        out_f, in_f = qt.shape
        n_groups = in_f // (grid.group or in_f)
        qweight, qzeros, scales, g_idx = (stored[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx"))
        assert qweight.dtype == np.int32 and qweight.shape == (in_f * grid.bits // 32, out_f)
        assert qzeros.dtype == np.int32 and qzeros.shape == (n_groups, out_f * grid.bits // 32)
        assert scales.dtype == np.float16 and scales.shape == (n_groups, out_f)
        assert g_idx.dtype == np.int32 and np.array_equal(g_idx, np.arange(in_f) // (grid.group or in_f))
        if grid.symmetric:  # v1: zero − 1 = 2**(bits-1) − 1 in every field
            word = 0x77777777 if grid.bits == 4 else 0x7F7F7F7F
            assert (qzeros.view(np.uint32) == word).all()
        got = documented_dequant(qweight, qzeros, scales, g_idx, grid.bits, v1=grid.symmetric)
        assert np.array_equal(got, qt.dequantize()), name
        assert np.array_equal(QuantizedFolder(out).tensor(name), qt.dequantize()), name
        n += 1
    assert n == 14


def test_marlin_warning() -> None:
    ok = [(4096, 4096), (11008, 4096), (4096, 11008)]
    assert marlin_blockers(get_scheme("int4_g128"), ok) == []
    assert marlin_blockers(get_scheme("int4_pc"), ok) == []
    why = marlin_blockers(get_scheme("int4_g64_asym"), [(1536, 576), (576, 1536)])
    assert any("asymmetric" in w for w in why) and any("576" in w and "128" in w for w in why)


def test_demo_shapes_warn_not_refuse(make_checkpoint, tiny_config, tmp_path: Path) -> None:
    """Rows of 64 (not a multiple of 128): written, with the kernel vLLM falls back to named."""
    _, _, result = _convert(make_checkpoint, tiny_config, tmp_path, "int4_g32")
    (w,) = result.warnings
    assert "gptq_marlin" in w and "exllama `gptq`" in w and "64" in w


@pytest.mark.parametrize(("scheme", "message"), [
    ("fp8_e4m3fn", "GPTQ layout holds 4- or 8-bit integer"),
    ("q4_k", "GPTQ layout holds 4- or 8-bit integer"),
    ("int4_g128", "one group size per model"),  # 128 divides down_proj's 128 but not the 64-wide rows
])
def test_refused_before_any_work(make_checkpoint, tiny_config, tmp_path: Path, scheme: str, message: str) -> None:
    src = make_checkpoint(tiny_config())
    with pytest.raises(QuantizeError, match=message):
        convert_to_gpu(src, tmp_path / "out", "gptq", scheme)
    assert not (tmp_path / "out").exists()


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is None or importlib.util.find_spec("optimum") is None,
                    reason="transformers 5.25 loads GPTQ only through optimum + GPTQModel (its CPU path), and "
                           "GPTQModel 7.7 requires torch >= 2.14.1 while the locked torch is 2.13.0+cpu")
def test_transformers_loads_gptq(make_checkpoint, tiny_config, tmp_path: Path) -> None:  # pragma: no cover
    import torch
    from transformers import AutoModelForCausalLM

    from qkiln.runtime.llama import LlamaModel

    out, _, _ = _convert(make_checkpoint, tiny_config, tmp_path, "int4_g32")
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).eval()
    ids = np.arange(3, 40)[None]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.float().numpy()
    assert np.abs(LlamaModel(QuantizedFolder(out)).forward(ids) - ref).max() < 5e-2
