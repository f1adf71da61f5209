"""Open a model for evaluation or generation from a path: a Hugging Face checkpoint folder or a GGUF file.

One place that knows which artifact kinds qkiln's runtime can run; commands call `load_model`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tokenizers

from qkiln.errors import UserError

if TYPE_CHECKING:
    from qkiln.runtime.llama import LlamaModel


@dataclasses.dataclass
class LoadedModel:
    path: Path
    model: LlamaModel
    tokenizer: tokenizers.Tokenizer

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without BOS or other added tokens (the evaluation rule)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        return self.model.forward(ids)


def resolve_model_path(model: Path | None) -> Path:
    """The given model, or the demo model (imported on first use) when none is given."""
    if model is not None:
        return model
    from qkiln.demo import demo_model_dir

    return demo_model_dir()


def load_model(model: Path | None) -> LoadedModel:
    path = resolve_model_path(model)
    if path.is_dir():
        from qkiln.formats.gpu_safetensors_read import QuantizedFolder, quant_method
        from qkiln.formats.hf import Checkpoint
        from qkiln.runtime.llama import LlamaModel

        if quant_method(path):  # compressed-tensors / GPTQ folder: packed weights, dequantized exactly
            qf = QuantizedFolder(path)
            return LoadedModel(path=path, model=LlamaModel(qf), tokenizer=qf.tokenizer())  # type: ignore[arg-type]
        ckpt = Checkpoint.open(path)
        return LoadedModel(path=path, model=LlamaModel(ckpt), tokenizer=ckpt.tokenizer())
    if not path.exists():
        raise UserError(f"model {path} not found; pass a Hugging Face checkpoint folder or a .gguf file")
    if path.suffix.lower() == ".gguf":
        # A GGUF runs on its own packed blocks through the C kernels (NumPy fallback), never re-quantized.
        from qkiln.kernels.linear import load_gguf_model

        return load_gguf_model(path)
    raise UserError(f"model {path} is neither a checkpoint folder nor a .gguf file")
