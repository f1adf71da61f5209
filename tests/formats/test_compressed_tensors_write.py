"""compressed-tensors artifacts: packing golden bytes, the package's own decompression equals dequantize()
exactly, its pydantic models accept the config, transformers loads the folder and its logits equal qkiln's
runtime on the same weights, and the FP8 bytes read the same as E4M3FNUZ with doubled scales (MI300)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qkiln.formats.compressed_tensors_write import pack_codes, unpack_codes
from qkiln.formats.gpu_safetensors_read import QuantizedFolder
from qkiln.formats.hf import Checkpoint
from qkiln.model.source import DictSource
from qkiln.pipeline.gpu import convert_to_gpu, plan_schemes
from qkiln.pipeline.stream import layer_ordered, weight_stream
from qkiln.quantize.tensor import QuantizedTensor

# Logits of transformers (float32, decompressed weights) against qkiln's NumPy runtime on the same
# weights: both float32, different summation orders. Measured max |Δ| on the tiny model: ~2e-6.
LOGIT_ATOL = 1e-4

INT_SCHEMES = ["int4_g32", "int4_g64_asym", "int4_pc", "int4_pc_asym", "int8"]
FP8_SCHEMES = ["fp8_e4m3fn_pc", "fp8_e4m3fn_pt"]


def test_pack_codes_golden() -> None:
    """Value i of a word at bits 4i, lowest first: codes 0..7 -> 0x76543210; 8..15 -> 0xFEDCBA98."""
    codes = np.arange(16, dtype=np.uint8).reshape(1, 16)
    words = pack_codes(codes, 4, axis=1)
    assert words.dtype == np.int32 and words.shape == (1, 2)
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == [0x76543210, 0xFEDCBA98]
    eight = pack_codes(np.array([[1, 2, 3, 255]], np.uint8), 8, axis=1)
    assert int(eight[0, 0]) & 0xFFFFFFFF == 0xFF030201
    along_rows = pack_codes(codes.T, 4, axis=0)  # (2, 1): the zero-point direction
    assert along_rows.shape == (2, 1) and int(along_rows[0, 0]) == 0x76543210


@settings(derandomize=True, max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 40), st.sampled_from([4, 8]), st.sampled_from([0, 1]), st.integers(0, 2**31))
def test_pack_unpack_round_trip(rows: int, cols: int, bits: int, axis: int, seed: int) -> None:
    codes = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, cols), dtype=np.uint8)
    n = codes.shape[axis]
    words = pack_codes(codes, bits, axis)
    assert words.shape[axis] == -(-n * bits // 32)
    assert np.array_equal(unpack_codes(words, bits, axis, n), codes)


def _artifact(make_checkpoint, tiny_config, tmp_path: Path, scheme: str, algo: str = "rtn", **kw) -> tuple[Path, dict]:
    """A tiny checkpoint converted to compressed-tensors, and the quantizer's own output for it."""
    src = make_checkpoint(tiny_config(**kw), name=f"src-{scheme}")
    calib = []
    if algo != "rtn":
        calib = [tmp_path / "calib.txt"]
        calib[0].write_text("The model weight of a quantized layer and the token scale group. " * 60)
    out = tmp_path / f"ct-{scheme}-{algo}"
    convert_to_gpu(src, out, "compressed-tensors", scheme, algorithm=algo, calib=calib, samples=4, seq_len=32)
    ckpt = Checkpoint.open(src)
    schemes, _ = plan_schemes(ckpt, scheme, "compressed-tensors")
    weights = dict(layer_ordered(weight_stream(ckpt, {n: s.name for n, s in schemes.items()}, algo, calib, samples=4, seq_len=32),
                                 ckpt.config))
    return out, weights


def transformers_weight(weights: dict, folder: QuantizedFolder, name: str) -> np.ndarray:
    w = weights[name]
    return w.dequantize().astype(np.float16).astype(np.float32) if isinstance(w, QuantizedTensor) else folder.tensor(name)


def _read_all(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.torch
@pytest.mark.parametrize(("scheme", "preset"), [("fp8_e4m3fn_pc", "FP8_DYNAMIC"), ("int4_g32", "W4A16"),
                                                ("int4_g64_asym", "W4A16_ASYM"), ("int8", "W8A16")])
def test_config_group_is_the_preset(scheme: str, preset: str) -> None:
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    from qkiln.formats.compressed_tensors_write import scheme_args
    from qkiln.quantize.registry import get_scheme

    ours = QuantizationScheme.model_validate({"targets": ["Linear"], **scheme_args(get_scheme(scheme))})
    theirs = preset_name_to_scheme(preset, ["Linear"])
    weights = theirs.weights
    if weights.strategy == "group":  # the presets say group 128; ours is the scheme's (per channel for int8)
        group = get_scheme(scheme).group
        weights = weights.model_copy(update={"group_size": group or None, "strategy": "group" if group else "channel"})
    assert ours.weights == weights
    assert ours.input_activations == theirs.input_activations and ours.output_activations is None


@pytest.mark.torch
@pytest.mark.parametrize("scheme", INT_SCHEMES + FP8_SCHEMES)
def test_package_decompression_equals_dequantize(make_checkpoint, tiny_config, tmp_path: Path, scheme: str) -> None:
    """compressed-tensors' own compressor, given the stored tensors, gives back dequantize() bit for bit
    (computing in float32; in the stored fp16 scale dtype it gives fp16(dequantize()), also exactly)."""
    import torch
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    algo = "gptq" if scheme == "int4_g32" else "rtn"
    out, weights = _artifact(make_checkpoint, tiny_config, tmp_path, scheme, algo)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(qc)  # the pydantic models vLLM validates with
    assert config.quantization_status == "compressed" and qc["ignore"] == ["lm_head"]
    for group in qc["config_groups"].values():
        QuantizationScheme.model_validate(group)  # extra="forbid": no unknown key
        assert group["weights"]["actorder"] is None
    (group,) = config.config_groups.values()
    compressor = BaseCompressor.load_from_registry(group.format)
    stored = _read_all(out)
    n_checked = 0
    for name, qt in weights.items():
        if not isinstance(qt, QuantizedTensor):
            assert stored[name].dtype == torch.float16
            continue
        m = name.removesuffix(".weight")
        local = {k[len(m) + 1 :]: v for k, v in stored.items() if k.startswith(m + ".")}
        ref = torch.from_numpy(qt.dequantize())
        f32 = {k: (v.float() if k == "weight_scale" else v) for k, v in local.items()}
        got = compressor.decompress(f32, group)["weight"]
        assert got.dtype == torch.float32 and torch.equal(got, ref), name
        if "weight_packed" in local:  # in the stored (model) dtype: one fp16 rounding of the same value
            got16 = compressor.decompress(dict(local), group)["weight"]
            assert got16.dtype == torch.float16 and torch.equal(got16, ref.half()), name
        n_checked += 1
    assert n_checked == 14  # 2 layers x 7 Linear


@pytest.mark.torch
@pytest.mark.parametrize("scheme", ["int4_g32", "int4_g64", "int4_pc", "int8", "int4_g64_asym", "fp8_e4m3fn_pc"])
def test_transformers_loads_and_matches_runtime(make_checkpoint, tiny_config, tmp_path: Path, scheme: str) -> None:
    """transformers + compressed-tensors loads the folder; its weights are dequantize()'s (exactly, or
    fp16-rounded where it decompresses in the fp16 scale dtype) and its logits equal qkiln's runtime's."""
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qkiln.runtime.llama import LlamaModel

    out, weights = _artifact(make_checkpoint, tiny_config, tmp_path, scheme)
    kw = {}
    fp16_rounded = False
    if scheme.endswith("_asym") or scheme.startswith("fp8"):
        # Decompress at load: FP8 would otherwise run W8A8 (per-token FP8 activations, by design), and
        # asymmetric INT4 hits compressed-tensors 0.20.1's meta skeleton, which declares the zero point
        # unpacked (out, n_groups) while its own compressor stores it packed (out/8, n_groups).
        kw["quantization_config"] = CompressedTensorsConfig(dequantize=True)
        fp16_rounded = scheme.endswith("_asym")  # decompressed in the scale's dtype (fp16) first
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **kw).eval()
    ids = np.random.default_rng(1).integers(3, 512, size=(2, 24))
    with torch.no_grad():
        ref_logits = model(torch.from_numpy(ids)).logits.numpy()
    # the default load decompresses on the first forward
    for name, qt in weights.items():
        if isinstance(qt, QuantizedTensor):
            ref = qt.dequantize()
            ref = ref.astype(np.float16).astype(np.float32) if fp16_rounded else ref
            assert np.array_equal(model.get_parameter(name).detach().numpy(), ref), name
    source: Any = QuantizedFolder(out)
    if fp16_rounded:  # the runtime on the very weights transformers holds (0.002 apart from the exact ones)
        source = DictSource(source.config, {n: transformers_weight(weights, source, n) for n in source.names()})
    got = LlamaModel(source).forward(ids)
    assert np.abs(got - ref_logits).max() <= LOGIT_ATOL


@pytest.mark.parametrize("scheme", FP8_SCHEMES)
def test_fp8_bytes_read_the_same_as_fnuz_with_double_scales(make_checkpoint, tiny_config, tmp_path: Path,
                                                           scheme: str) -> None:
    """AMD MI300 (gfx942) computes E4M3FNUZ; vLLM loads our OCP E4M3FN bytes there by reinterpreting them as
    FNUZ (bias 8, one less than FN's 7) and doubling the scales. That is exact for every byte we write:
    no 0x80 (−0 in FN, NaN in FNUZ) and no FN NaN (0x7F/0xFF, ±240 in FNUZ)."""
    # a weight of −tiny rounds to −0 in E4M3FN: the writer must store +0
    w = {"model.layers.0.mlp.up_proj.weight": np.full((128, 64), 1e-3, np.float32)}
    w["model.layers.0.mlp.up_proj.weight"][:, 0] = -1e-12
    src = make_checkpoint(tiny_config(), extra=w, name="src-fp8")
    out = tmp_path / "fp8"
    convert_to_gpu(src, out, "compressed-tensors", scheme)
    folder = QuantizedFolder(out)
    n = 0
    for name in folder.names():
        m = name.removesuffix(".weight")
        if f"{m}.weight_scale" not in folder._entries:
            continue
        codes = folder.raw(name).view(np.uint8)
        assert not np.isin(codes, [0x80, 0x7F, 0xFF]).any(), name
        scale = folder.raw(f"{m}.weight_scale").astype(np.float32).reshape(-1, 1)
        fn = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale
        fnuz = codes.view(ml_dtypes.float8_e4m3fnuz).astype(np.float32) * (scale * 2)
        assert np.array_equal(fn, fnuz), name
        assert np.array_equal(fn, folder.tensor(name)), name
        n += codes.size
    assert n == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)


def test_deterministic_and_sharded(make_checkpoint, tiny_config, tmp_path: Path) -> None:
    """Same inputs, same bytes; a small shard size gives several shards that the index maps completely."""
    src = make_checkpoint(tiny_config())
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        convert_to_gpu(src, d, "compressed-tensors", "int4_g32", shard_bytes=40_000)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    shards = sorted(a.glob("model-*.safetensors"))
    assert len(shards) > 2 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(QuantizedFolder(a).files) == len(shards)


def test_failure_leaves_nothing(make_checkpoint, tiny_config, tmp_path: Path, monkeypatch) -> None:
    """A failure while streaming (here: the third tensor) leaves no folder and no temporary behind."""
    import qkiln.formats.compressed_tensors_write as ct

    src = make_checkpoint(tiny_config())
    calls = {"n": 0}
    real = ct.pack_tensor

    def failing(name, qt):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real(name, qt)

    monkeypatch.setattr(ct, "pack_tensor", failing)
    with pytest.raises(OSError):
        convert_to_gpu(src, tmp_path / "out", "compressed-tensors", "int4_g32", shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
