"""Run an ONNX decoder folder (qkiln's or onnxruntime-genai builder's) through onnxruntime, and describe it.

`OnnxLlama.forward(ids)` gives the logits of a whole window (an empty KV cache, attention mask of ones),
which is what `qkiln eval` scores; `step` runs a prompt then token by token through the cache, for tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.errors import UserError
from qkiln.model.config import LlamaConfig


def _config_of(folder: Path) -> LlamaConfig:
    """qkiln.json's config when qkiln wrote the folder, else what genai_config.json says (the builder's)."""
    manifest = folder / "qkiln.json"
    if manifest.is_file():
        return LlamaConfig.from_dict(json.loads(manifest.read_text())["config"], source=str(manifest))
    doc = json.loads((folder / "genai_config.json").read_text())["model"]
    dec = doc["decoder"]
    return LlamaConfig(vocab_size=int(doc["vocab_size"]), hidden_size=int(dec["hidden_size"]), intermediate_size=0,
                       num_hidden_layers=int(dec["num_hidden_layers"]), num_attention_heads=int(dec["num_attention_heads"]),
                       num_key_value_heads=int(dec["num_key_value_heads"]), head_dim=int(dec["head_size"]),
                       max_position_embeddings=int(doc["context_length"]))


class OnnxLlama:
    """An ONNX Llama decoder in an onnxruntime CPU session."""

    def __init__(self, folder: Path, *, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("running an ONNX folder needs onnxruntime: pip install onnxruntime") from None
        self.folder = folder
        self.config = _config_of(folder)
        genai = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(folder / genai["filename"]), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._past = {i.name: i.type for i in self.session.get_inputs() if i.name.startswith("past_key_values.")}

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        cfg = self.config
        dtype = np.float16 if any("float16" in t for t in self._past.values()) else np.float32
        return {name: np.zeros((batch, cfg.num_key_value_heads, 0, cfg.head_dim), dtype) for name in self._past}

    def step(self, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits (b, s, vocab) float32 for `ids` (b, s) after the cached positions, and the new cache."""
        ids = np.asarray(ids, dtype=np.int64)
        b, s = ids.shape
        past = past if past is not None else self._empty_past(b)
        done = next(iter(past.values())).shape[2] if past else 0
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, done + s), np.int64), **past}
        out = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        present = {k.replace("present.", "past_key_values.", 1): v for k, v in out.items() if k.startswith("present.")}
        return np.asarray(out["logits"], dtype=np.float32), present

    def forward(self, ids: np.ndarray) -> np.ndarray:
        return self.step(ids)[0]

    __call__ = forward


def describe_folder(folder: Path) -> dict[str, Any]:
    """What an ONNX folder holds: files, the MatMulNBits weights (bits, block, zero points, bytes), genai_config."""
    import onnx

    genai = json.loads((folder / "genai_config.json").read_text())
    model = onnx.load(str(folder / genai["model"]["decoder"]["filename"]), load_external_data=False)
    sizes: dict[str, int] = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    ops: dict[str, int] = {}
    weights: dict[str, dict[str, Any]] = {}
    streamed = 0  # bytes every token reads: the products' weights (codes, scales, zero points, float matrices)
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
        if node.op_type in ("MatMul", "MatMulNBits"):
            streamed += sum(sizes.get(n, 0) for n in node.input[1:] if n)
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kind = f"int{attrs['bits']} block {attrs['block_size']}" + (" zero points" if len(node.input) > 3 and node.input[3] else "")
            agg = weights.setdefault(kind, {"tensors": 0, "weights": 0, "bytes": 0,
                                            "accuracy_level": attrs.get("accuracy_level", 0)})
            agg["tensors"] += 1
            agg["weights"] += int(attrs["K"]) * int(attrs["N"])
            agg["bytes"] += sum(sizes.get(n, 0) for n in node.input[1:] if n)
    for agg in weights.values():
        agg["bits_per_weight"] = round(8 * agg["bytes"] / max(1, agg["weights"]), 4)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = folder / "qkiln.json"
    doc: dict[str, Any] = {
        "path": str(folder),
        "format": "onnx",
        "files": files,
        "folder_bytes": sum(files.values()),
        "ir_version": model.ir_version,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "ops": dict(sorted(ops.items())),
        "matmulnbits": dict(sorted(weights.items())),
        "initializer_bytes": sum(sizes.values()),
        "matmul_weight_bytes": streamed,
        "genai_config": {k: genai["model"].get(k) for k in ("type", "context_length", "bos_token_id", "eos_token_id", "pad_token_id", "vocab_size")}
        | {"max_length": genai.get("search", {}).get("max_length")},
        "metadata": {p.key: p.value for p in model.metadata_props},
    }
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        doc["qkiln"] = {k: m.get(k) for k in ("scheme", "algorithm", "source", "graph", "fallbacks", "calibration_sha256")}
    return doc
