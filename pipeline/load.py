"""Open a model for evaluation or generation from a path: a Hugging Face checkpoint folder, an ONNX folder
or a GGUF file.

One place that knows which artifact kinds qkiln's runtime can run; commands call `load_model`.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers

from qkiln.demo import demo_model_dir
from qkiln.errors import UserError
from qkiln.formats.gguf_model import load_gguf_model
from qkiln.formats.gpu_safetensors_read import QuantizedFolder, quant_method
from qkiln.formats.hf import Checkpoint
from qkiln.formats.onnx_run import OnnxLlama
from qkiln.runtime.llama import LlamaModel
from qkiln.runtime.load import LoadedModel


def resolve_model_path(model: Path | None) -> Path:
    """The given model, or the demo model (imported on first use) when none is given."""
    if model is not None:
        return model
    return demo_model_dir()


def artifact_format(path: Path) -> str | None:
    """The format of a quantized artifact (gguf, onnx, compressed-tensors, gptq), None for anything else."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return "gguf"
    if path.is_dir() and (path / "genai_config.json").is_file():
        return "onnx"
    if path.is_dir():
        return quant_method(path)  # compressed-tensors | gptq: the --to names are the quant_method names
    return None


def load_model(model: Path | None) -> LoadedModel:
    path = resolve_model_path(model)
    if path.is_dir() and (path / "genai_config.json").is_file():
        # An ONNX folder (qkiln's or onnxruntime-genai's) runs through onnxruntime on its own weights.
        tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        return LoadedModel(path=path, model=OnnxLlama(path), tokenizer=tok)  # type: ignore[arg-type]
    if path.is_dir() and quant_method(path):
        # A compressed-tensors / GPTQ folder: its packed weights, dequantized exactly.
        qf = QuantizedFolder(path)
        return LoadedModel(path=path, model=LlamaModel(qf), tokenizer=qf.tokenizer())  # type: ignore[arg-type]
    if path.is_dir():
        ckpt = Checkpoint.open(path)
        return LoadedModel(path=path, model=LlamaModel(ckpt), tokenizer=ckpt.tokenizer())
    if not path.exists():
        raise UserError(f"model {path} not found; pass a Hugging Face checkpoint folder, an ONNX, compressed-tensors or GPTQ folder, or a .gguf file")
    if path.suffix.lower() == ".gguf":
        # A GGUF runs on its own packed blocks through the C kernels (NumPy fallback), never re-quantized.
        return load_gguf_model(path)
    raise UserError(f"model {path} is neither a checkpoint folder nor a .gguf file")
