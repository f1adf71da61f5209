"""`QuantizedTensor`: what every quantizer produces and every format writer consumes."""

from __future__ import annotations

import dataclasses

import numpy as np

from qkiln.quantize.ggml_types import GGML_TYPES
from qkiln.quantize.scheme import Params, Scheme


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A 2-D weight on a scheme's grid.

    codes   (rows, cols) uint8 — one code per weight (unsigned integer code, or FP8 bit pattern)
    params  scheme-specific stored numbers, each with leading dim `rows` (see the scheme's docstring)
    shape   (rows, cols) = (out_features, in_features), Hugging Face's Linear layout
    """

    scheme: Scheme
    codes: np.ndarray
    params: Params
    name: str = ""

    def __post_init__(self) -> None:
        assert self.codes.ndim == 2 and self.codes.dtype == np.uint8, (self.codes.shape, self.codes.dtype)
        for key, p in self.params.items():
            assert p.shape[0] == self.codes.shape[0], (key, p.shape, self.codes.shape)

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """Exact float32 weights (rows, cols)."""
        return self.scheme.decode(self.codes, self.params)

    def take_rows(self, rows: np.ndarray | slice) -> QuantizedTensor:
        """The tensor of rows `rows` ((k,) int, or a slice: views, no copy): rows are independent on every
        grid (params are per row)."""
        return QuantizedTensor(scheme=self.scheme, codes=self.codes[rows],
                               params={k: v[rows] for k, v in self.params.items()}, name=self.name)

    @property
    def nbytes(self) -> int:
        """Bytes this tensor takes in its format: ggml block bytes for llama.cpp grids, else packed codes
        (bits per weight, rounded up per tensor) plus the params as stored."""
        rows, cols = self.shape
        if self.scheme.name in GGML_TYPES:
            _, block, size = GGML_TYPES[self.scheme.name]
            return rows * (cols // block) * size
        bits = getattr(self.scheme, "bits", 8)
        # a per-tensor scale is repeated on every row here but stored once
        params = sum(int(p[:1].nbytes if self.scheme.per_tensor else p.nbytes) for p in self.params.values())
        return -(-rows * cols * bits // 8) + params

    @property
    def bits_per_weight(self) -> float:
        rows, cols = self.shape
        return 8.0 * self.nbytes / (rows * cols)
