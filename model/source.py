"""Where the runtime and the quantizers get weights from: anything that hands out one tensor by name."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

from qkiln.model.config import LlamaConfig


class TensorSource(Protocol):
    """A model's tensors by Hugging Face name, read one at a time (a checkpoint on disk, a dict in memory)."""

    config: LlamaConfig

    def names(self) -> list[str]: ...

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 (a fresh array or a read-only view; callers must not write to it)."""
        ...


class DictSource:
    """Tensors held in memory, e.g. a model made in a test or weights replaced after quantization."""

    def __init__(self, config: LlamaConfig, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]]):
        self.config = config
        self._tensors = {k: np.asarray(v, dtype=np.float32) for k, v in dict(tensors).items()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def tensor(self, name: str) -> np.ndarray:
        return self._tensors[name]
