"""A runnable model with its tokenizer: what `pipeline.load.load_model` opens from a checkpoint folder or a GGUF."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import tokenizers

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
