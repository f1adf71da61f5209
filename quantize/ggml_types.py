"""The llama.cpp grids qkiln stores in GGUF blocks, by scheme name: their ggml type and block geometry.

Apart from `ggml_pack` so that `QuantizedTensor` and the scheme registry can ask a tensor's block size
without importing the packer (which imports them).
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from qkiln.errors import QuantizeError

QK_K = 256

# The grids a GGUF can store: scheme name -> (ggml type name, block size, bytes per block); the sizes are
# gguf-py's GGML_QUANT_SIZES, the table llama.cpp's own Python tools use.
GGML_TYPES: dict[str, tuple[str, int, int]] = {
    name: (name.upper(), *GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]])
    for name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
}


def ggml_type_name(scheme_name: str) -> str:
    """The ggml type ("Q4_0", ...) for a scheme, or QuantizeError if the scheme has no GGUF block."""
    try:
        return GGML_TYPES[scheme_name][0]
    except KeyError:
        raise QuantizeError(
            f"scheme {scheme_name!r} has no ggml block type; GGUF takes {', '.join(GGML_TYPES)}"
        ) from None
