"""Write a Hugging Face Llama checkpoint folder (config.json, model.safetensors, tokenizer files), atomically."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from qkiln.atomic import atomic_dir
from qkiln.formats.safetensors_write import write_safetensors
from qkiln.model.config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def write_checkpoint(
    dest: str | Path,
    config: LlamaConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    tokenizer_from: Path | None = None,
    extra_files: dict[str, str] | None = None,
    metadata: dict[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `dest/` with a single `model.safetensors`; the folder appears only when complete.

    Tensors are written in sorted name order with sorted metadata, so the same inputs give the same bytes.
    `tokenizer_from` is a folder whose tokenizer files are copied; `extra_files` maps a file name to its text.
    """
    dest = Path(dest)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", dict(tensors), metadata={"format": "pt", **(metadata or {})})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
        if tokenizer_from is not None:
            for fname in TOKENIZER_FILES:
                if (tokenizer_from / fname).is_file():
                    shutil.copyfile(tokenizer_from / fname, tmp / fname)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
    return dest
