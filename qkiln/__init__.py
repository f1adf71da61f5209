"""qkiln: quantize a Hugging Face Llama checkpoint into artifacts each target's runtime loads as they are."""

from __future__ import annotations

__version__ = "0.1.0"
