"""A sharded Hugging Face safetensors folder, written while the tensors are still being produced.

Layout (what transformers, vLLM and SGLang read):
    model-0000N-of-0000M.safetensors   tensors in arrival order, cut when a shard reaches `shard_bytes`
    model.safetensors.index.json       {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    config.json, generation_config.json, tokenizer files, README.md, any extra JSON/text files

Tensors go to a spill file as they arrive and a shard is written from it as soon as it is full, so memory
holds one tensor (a large float one, one block of rows), never a shard; shards are written under a
provisional name and renamed once M is known. The whole folder is assembled in a
temporary sibling and renamed into place only when complete (`qkiln.atomic.atomic_dir`): a failure or a
`kill -9` leaves nothing at the destination. Same inputs, same bytes: each shard's tensors are sorted
by name (`safetensors_write`), every JSON file is written with sorted keys, nothing records a time.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qkiln.atomic import atomic_dir
from qkiln.formats.safetensors_write import write_safetensors
from qkiln.model.source import LazyRows, row_blocks

# Tokenizer files copied from the source checkpoint when present.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 10**9  # transformers' default max_shard_size is 5 GB; 2 GB keeps memory modest


def dump_json(doc: Any) -> str:
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


# A tensor given as its dtype, shape and data blocks in order (rows, made while the shard is written).
Blocks = tuple[np.dtype, tuple[int, ...], Iterable[np.ndarray]]
SPILL_READ_BYTES = 64 * 2**20  # bytes copied at a time from the spill file into a shard


class ShardWriter:
    """Takes (name, array or `Blocks`) pairs and writes a shard each time `shard_bytes` have arrived.

    A tensor's bytes go to a spill file as they arrive, and a full shard is written from it (its header needs
    every tensor's name and size first, its data sorted by name): memory holds one block, never a shard."""

    def __init__(self, folder: Path, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder, self.shard_bytes = folder, shard_bytes
        self._spill_path = folder / ".spill"
        self._spill = open(self._spill_path, "wb")
        self._buf: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}  # name -> dtype, shape, offset, bytes
        self._buf_bytes = 0
        self._parts: list[list[str]] = []  # tensor names of each written shard
        self.total_size = 0

    def add(self, name: str, tensor: np.ndarray | Blocks) -> None:
        if name in self._buf or any(name in p for p in self._parts):
            raise AssertionError(f"tensor {name} written twice")
        blocks: Iterable[np.ndarray]
        if isinstance(tensor, np.ndarray):
            dtype, shape, blocks = tensor.dtype, tuple(tensor.shape), [tensor]
        else:
            dtype, shape, blocks = np.dtype(tensor[0]), tuple(tensor[1]), tensor[2]
        offset = self._spill.tell()
        for b in blocks:
            if b.dtype != dtype:
                raise AssertionError(f"{name}: a block of {b.dtype}, declared {dtype}")
            self._spill.write(np.ascontiguousarray(b).reshape(-1).view(np.uint8).data)
        nbytes = self._spill.tell() - offset
        self._buf[name] = (dtype, shape, offset, nbytes)
        self._buf_bytes += nbytes
        self.total_size += nbytes
        if self._buf_bytes >= self.shard_bytes:
            self._flush()

    def _spilled(self, offset: int, nbytes: int, dtype: np.dtype) -> Iterator[np.ndarray]:
        with open(self._spill_path, "rb") as f:
            for start in range(0, nbytes, SPILL_READ_BYTES):
                f.seek(offset + start)
                yield np.frombuffer(f.read(min(SPILL_READ_BYTES, nbytes - start)), dtype=dtype)

    def _flush(self) -> None:
        if not self._buf:
            return
        self._spill.flush()
        specs = {n: (dt, shape, functools.partial(self._spilled, off, nb, dt)) for n, (dt, shape, off, nb) in self._buf.items()}
        write_safetensors(self.folder / f".part-{len(self._parts):05d}", specs, metadata={"format": "pt"})
        self._parts.append(sorted(self._buf))
        self._buf, self._buf_bytes = {}, 0
        self._spill.seek(0)
        self._spill.truncate()

    def close(self) -> dict[str, str]:
        """Write the last shard, give the shards their final names, write the index; the weight map."""
        self._flush()
        self._spill.close()
        self._spill_path.unlink()
        m = len(self._parts)
        weight_map: dict[str, str] = {}
        for i, names in enumerate(self._parts):
            fname = f"model-{i + 1:05d}-of-{m:05d}.safetensors"
            (self.folder / f".part-{i:05d}").rename(self.folder / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(dump_json(index))
        return weight_map


def float16_tensor(w: np.ndarray | LazyRows) -> np.ndarray | Blocks:
    """A weight kept in float, as float16 (what the GPU folders store): 2-D ones a block of rows at a time."""
    if w.ndim != 2:
        return np.asarray(w, dtype=np.float32).astype(np.float16)
    return np.dtype(np.float16), tuple(w.shape), (b.astype(np.float16) for b in row_blocks(w))


def generation_config(config_dict: Mapping[str, Any], source: Path | None) -> dict[str, Any]:
    """The source's generation_config.json when it has one, else the token ids from config.json."""
    if source is not None and (source / "generation_config.json").is_file():
        doc = json.loads((source / "generation_config.json").read_text(encoding="utf-8"))
        if isinstance(doc, dict):
            return doc
    out: dict[str, Any] = {"_from_model_config": True}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config_dict.get(k) is not None:
            out[k] = config_dict[k]
    return out


def write_folder(
    dest: str | Path,
    tensors: Iterable[tuple[str, np.ndarray | Blocks]],
    config_dict: Mapping[str, Any] | Callable[[], Mapping[str, Any]],
    *,
    tokenizer_from: Path | None = None,
    files: Mapping[str, str | Callable[[], str]] | None = None,
    shard_bytes: int | None = None,  # None: DEFAULT_SHARD_BYTES
    overwrite: bool = False,
) -> Path:
    """Write the folder `dest` from `tensors` (consumed once, in order, shard by shard), atomically.

    `config_dict` becomes config.json; `files` maps extra file names (README.md, quantize_config.json) to
    their text. Either may be a function, called after the last tensor is written: a writer learns the
    grids (hence the quantization config) only from the stream. Tokenizer files and generation_config.json come from `tokenizer_from` when it has them.
    """
    dest = Path(dest)
    with atomic_dir(dest, overwrite=overwrite) as tmp:
        shards = ShardWriter(tmp, shard_bytes or DEFAULT_SHARD_BYTES)
        for name, array in tensors:
            shards.add(name, array)
        shards.close()
        cfg = dict(config_dict() if callable(config_dict) else config_dict)
        (tmp / "config.json").write_text(dump_json(cfg))
        (tmp / "generation_config.json").write_text(dump_json(generation_config(cfg, tokenizer_from)))
        if tokenizer_from is not None:
            for fname in TOKENIZER_FILES:
                if (tokenizer_from / fname).is_file():
                    shutil.copyfile(tokenizer_from / fname, tmp / fname)
        for fname, text in (files or {}).items():
            (tmp / fname).write_text(text() if callable(text) else text, encoding="utf-8")
    return dest
