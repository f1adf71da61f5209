"""An ONNX folder onnxruntime-genai loads as it is: model.onnx, model.onnx.data, genai_config.json, the
tokenizer files and qkiln.json (what was written and how), atomically.

The folder appears only when complete (`qkiln.atomic.atomic_dir`: a temporary sibling renamed at the end),
and identical inputs give identical bytes: the graph is serialized deterministically, initializers are
written in the quantizer's order at fixed alignments, and every JSON file has sorted keys.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qkiln.atomic import atomic_dir
from qkiln.formats.genai_config import copy_tokenizer, genai_config
from qkiln.formats.onnx_graph import GraphOptions, Weight, write_model
from qkiln.model.config import LlamaConfig

MANIFEST = "qkiln.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"


@dataclasses.dataclass(frozen=True)
class OnnxResult:
    path: Path
    kinds: dict[str, str]  # HF tensor name -> how it is stored
    quantized_bytes: int
    float_bytes: int

    def summary(self) -> dict[str, Any]:
        files = {p.name: p.stat().st_size for p in sorted(self.path.iterdir())}
        by_kind: dict[str, int] = {}
        for kind in self.kinds.values():
            by_kind[kind] = by_kind.get(kind, 0) + 1
        return {"path": str(self.path), "files": files, "folder_bytes": sum(files.values()),
                "quantized_bytes": self.quantized_bytes, "float_bytes": self.float_bytes,
                "tensor_kinds": dict(sorted(by_kind.items()))}


def write_onnx_folder(
    dest: str | Path,
    config: LlamaConfig,
    tensors: Iterable[tuple[str, Weight]],
    tokenizer_dir: Path,
    *,
    options: GraphOptions | None = None,
    provenance: dict[str, Any] | None = None,
    max_length: int | None = None,
    overwrite: bool = False,
) -> OnnxResult:
    """Write the folder `dest` from the quantizer's stream (see `onnx_graph.write_model` for its order)."""
    dest = Path(dest)
    options = options or GraphOptions()
    prov = dict(provenance or {})
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        metadata = {f"qkiln.{k}": json.dumps(v, sort_keys=True) if not isinstance(v, str) else v for k, v in prov.items()}
        graph = write_model(tmp, config, tensors, options, metadata, data_name=DATA_FILE)
        copy_tokenizer(tokenizer_dir, tmp, context_length=graph.context_length)
        doc = genai_config(config, tokenizer_dir, context_length=graph.context_length, filename=MODEL_FILE,
                           max_length=max_length)
        (tmp / "genai_config.json").write_text(json.dumps(doc, indent=4, sort_keys=True) + "\n")
        manifest = {
            "format": "onnx",
            "files": {"model": MODEL_FILE, "data": DATA_FILE},
            "config": config.to_dict(),
            "graph": {"float_dtype": options.float_dtype, "accuracy_level": options.accuracy_level,
                      "context_length": graph.context_length},
            "tensors": graph.kinds,
            "quantized_bytes": graph.stats["quantized_bytes"],
            "float_bytes": graph.stats["float_bytes"],
            **prov,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        kinds = dict(graph.kinds)
        stats = dict(graph.stats)
    return OnnxResult(path=dest, kinds=kinds, quantized_bytes=stats["quantized_bytes"], float_bytes=stats["float_bytes"])


def is_onnx_folder(path: Path) -> bool:
    return path.is_dir() and (path / MODEL_FILE).is_file() and (path / "genai_config.json").is_file()
