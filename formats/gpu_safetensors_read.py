"""Read GPU-serving safetensors folders (compressed-tensors, the GPTQ layout) back into float32 weights.

`QuantizedFolder` is a `model.source.TensorSource`: `qkiln eval --model DIR` runs it through the NumPy
runtime, and `qkiln inspect DIR` describes it. Packed weights are unpacked from the layouts as their
documentation defines them (see `formats.compressed_tensors_write`, `formats.gptq_write`) and dequantized
with the formats' arithmetic in float32, w = (q − zero) · scale (integers) or fp8 · scale, one rounding —
for qkiln's own artifacts exactly `QuantizedTensor.dequantize()`. Any producer's folder in these layouts
reads the same way (GPTQ with act-order g_idx included).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qkiln.errors import CheckpointError
from qkiln.formats.compressed_tensors_write import unpack_codes
from qkiln.formats.hf import Checkpoint, _read_weight_headers, quantization_config
from qkiln.formats.safetensors_check import SafetensorsHeader, TensorEntry
from qkiln.model.config import LlamaConfig
from qkiln.model.names import expected_shapes

NP_DTYPES: dict[str, Any] = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "I32": np.int32, "I64": np.int64, "I8": np.int8, "U8": np.uint8,
}
METHODS = ("compressed-tensors", "gptq")


def quant_method(folder: Path) -> str | None:
    """config.json's quantization_config.quant_method, when the folder has one qkiln can read."""
    qc = quantization_config(folder)
    method = qc.get("quant_method") if qc is not None else None
    return method if method in METHODS else None


class QuantizedFolder:
    """A compressed-tensors or GPTQ folder, its Llama tensors dequantized to float32 on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = json.loads((self.path / "config.json").read_text(encoding="utf-8"))
        self.config = LlamaConfig.from_dict(raw, source=str(self.path / "config.json"))
        self.qconfig: dict[str, Any] = raw["quantization_config"]
        self.method: str = self.qconfig["quant_method"]
        headers, entries, owner = _read_weight_headers(self.path)
        self.files = [h.path for h in headers]
        self._entries: dict[str, TensorEntry] = entries
        self._owner: dict[str, SafetensorsHeader] = owner
        self._shapes = expected_shapes(self.config)
        missing = [n for n in self._shapes if self._stored_form(n) is None]
        if missing:
            raise CheckpointError(f"{self.path}: tensor {missing[0]!r} is missing (neither float nor packed)")

    # -- raw tensors ----------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """A stored tensor as its NumPy dtype (a copy)."""
        e = self._entries[name]
        h = self._owner[name]
        if os.stat(h.path).st_size != h.file_size:
            raise CheckpointError(f"{h.path} changed size since it was opened; open it again")
        if e.numel == 0:
            return np.zeros(e.shape, NP_DTYPES[e.dtype])
        return np.array(np.memmap(h.path, dtype=NP_DTYPES[e.dtype], mode="r", offset=e.offset, shape=e.shape))

    def _stored_form(self, name: str) -> str | None:
        m = name.removesuffix(".weight")
        if f"{m}.weight_packed" in self._entries:
            return "pack-quantized"
        if f"{m}.qweight" in self._entries:
            return "gptq"
        if name in self._entries:
            return "float-quantized" if f"{m}.weight_scale" in self._entries else "float"
        return None

    def _ct_args(self, module: str) -> dict[str, Any]:
        import re

        for group in self.qconfig.get("config_groups", {}).values():
            for t in group.get("targets", []):
                if t == "Linear" or t == module or (t.startswith("re:") and re.match(t[3:], module)):
                    return dict(group["weights"])
        raise CheckpointError(f"{self.path}: no config group targets {module}")

    # -- TensorSource ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> np.ndarray:
        form = self._stored_form(name)
        m = name.removesuffix(".weight")
        if form == "float":
            return self.raw(name).astype(np.float32)
        if form == "float-quantized":
            scale = self.raw(f"{m}.weight_scale").astype(np.float32)
            scale = scale.reshape(-1, 1) if scale.ndim == 2 or scale.size > 1 else scale.reshape(1, 1)
            return self.raw(name).astype(np.float32) * scale
        if form == "pack-quantized":
            return self._pack_quantized(m)
        if form == "gptq":
            return self._gptq(m)
        raise KeyError(f"{name!r} is not a tensor of {self.path}")

    def _pack_quantized(self, m: str) -> np.ndarray:
        args = self._ct_args(m)
        bits = int(args["num_bits"])
        out, cols = (int(x) for x in self.raw(f"{m}.weight_shape"))
        q = unpack_codes(self.raw(f"{m}.weight_packed"), bits, axis=1, n=cols).astype(np.int16)  # (out, in)
        scale = self.raw(f"{m}.weight_scale").astype(np.float32)  # (out, n_groups)
        n_groups = scale.shape[1]
        if args.get("symmetric", True):
            zero = np.full((out, n_groups), 1 << (bits - 1), np.int16)
        else:
            zero = unpack_codes(self.raw(f"{m}.weight_zero_point"), bits, axis=0, n=out).astype(np.int16)
        return _dequant(q, zero, scale, np.arange(cols) // (cols // n_groups))

    def _gptq(self, m: str) -> np.ndarray:
        bits = int(self.qconfig["bits"])
        scales = self.raw(f"{m}.scales").astype(np.float32)  # (n_groups, out)
        n_groups, out = scales.shape
        qweight = self.raw(f"{m}.qweight")  # (in·bits/32, out)
        cols = qweight.shape[0] * 32 // bits
        q = unpack_codes(qweight, bits, axis=0, n=cols).T.astype(np.int16)  # (out, in)
        zero = unpack_codes(self.raw(f"{m}.qzeros"), bits, axis=1, n=out).T.astype(np.int16)  # (out, n_groups)
        if self.qconfig.get("checkpoint_format", "gptq") == "gptq":
            zero = zero + 1  # v1 stores zero − 1 (a v1 reader adds it back, no wrap)
        g_idx = self.raw(f"{m}.g_idx").astype(np.int64) if f"{m}.g_idx" in self._entries else np.arange(cols) // (cols // n_groups)
        return _dequant(q, zero, scales.T, g_idx)

    # -- tokenizer (the checkpoint reader's rules: tokenizer.json, inside the folder) -------------------

    def tokenizer_path(self) -> Path:
        return Checkpoint.tokenizer_path(self)  # type: ignore[arg-type]

    def tokenizer(self) -> Any:
        return Checkpoint.tokenizer(self)  # type: ignore[arg-type]

    # -- inspect --------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        forms: dict[str, int] = {}
        for n in self._shapes:
            f = self._stored_form(n) or "?"
            forms[f] = forms.get(f, 0) + 1
        sizes = [h.file_size for h in {id(h): h for h in self._owner.values()}.values()]
        n_weights = sum(int(np.prod(s)) for s in self._shapes.values())
        total = sum(e.nbytes for e in self._entries.values())
        return {
            "path": str(self.path),
            "format": self.method,
            "quantization_config": self.qconfig,
            "files": [f.name for f in self.files],
            "file_bytes": int(sum(sizes)),
            "tensor_bytes": int(total),
            "n_weights": n_weights,
            "bits_per_weight": round(8 * total / max(1, n_weights), 4),
            "tensor_forms": forms,
            "tensors": {n: {"dtype": e.dtype, "shape": list(e.shape)} for n, e in sorted(self._entries.items())},
        }


def _dequant(q: np.ndarray, zero: np.ndarray, scale: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """(q − zero[:, g]) · scale[:, g] in float32 for q (out, in) int16, zero/scale (out, n_groups)."""
    v = (q - zero[:, g_idx]).astype(np.float32)
    v *= scale[:, g_idx]
    return v
