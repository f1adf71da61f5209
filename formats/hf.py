"""Read a Hugging Face Llama checkpoint folder lazily: config, safetensors weights, tokenizer.

`Checkpoint.open` does every cheap check up front — config, weight files, headers, tensor names,
shapes and dtypes — so a bad folder fails in a second with one line saying what is wrong, not an
hour into a quantization run. Tensor data is read only when asked for, one tensor (or, through
`Checkpoint.lazy`, one block of rows) at a time, so a checkpoint larger than RAM can be processed layer
by layer.

Pickled checkpoints (`pytorch_model.bin`, `*.pt`) are refused, never unpickled: loading a pickle runs
whatever code its author put in it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from qkiln.errors import CheckpointError
from qkiln.formats.safetensors_check import SafetensorsHeader, TensorEntry, read_header
from qkiln.kernels.reference import BF16, widen
from qkiln.model.config import LlamaConfig, Rope
from qkiln.model.names import expected_shapes
from qkiln.model.source import LazyRows

if TYPE_CHECKING:
    import tokenizers

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# Stored dtype -> little-endian NumPy dtype it is memory-mapped as (BF16 as raw uint16 bits).
READABLE_DTYPES: dict[str, str] = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}
READ_FLOATS = 1 << 18  # values per read of a BF16/F16 tensor: the raw block beside the float32 result (512 KiB)


def _containment_root(folder: Path) -> Path:
    """The folder that weight files (after following symlinks) must stay inside.

    The Hugging Face hub cache stores `models--org--name/snapshots/<rev>/model.safetensors` as a
    symlink to `../../blobs/<sha>`; those stay inside the cached repository folder, so that folder is
    the boundary there. Anywhere else it is the checkpoint folder itself.
    """
    real = folder.resolve()
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        return real.parent.parent
    return real


def _resolve_inside(folder: Path, name: str, *, what: str) -> Path:
    """`folder / name`, refusing names that point (directly or through a symlink) outside the checkpoint."""
    rel = Path(name)
    if not name or rel.is_absolute() or ".." in rel.parts or "\\" in name:
        raise CheckpointError(
            f"{folder}: {what} names file {name!r}, which is outside the checkpoint folder; "
            "file names must be plain relative names"
        )
    path = folder / rel
    root = _containment_root(folder)
    if not path.resolve().is_relative_to(root):
        raise CheckpointError(
            f"{folder}: {what} file {name!r} is a symlink to {path.resolve()}, outside the checkpoint folder; "
            "copy the file into the folder"
        )
    if not path.is_file():
        raise CheckpointError(f"{folder}: {what} file {name!r} does not exist; the checkpoint is incomplete")
    return path


def _read_index(folder: Path) -> dict[str, str]:
    path = folder / INDEX_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the shard index ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{path}: weight_map must be a non-empty object mapping tensor names to file names")
    return wm


def _refuse_pickles(folder: Path) -> NoReturn:
    """Explain why a folder without safetensors weights cannot be read."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickled weights ({', '.join(pickles[:3])}); loading a pickle runs arbitrary code, "
            "so qkiln refuses it: convert the checkpoint to safetensors first (e.g. save_pretrained(..., "
            "safe_serialization=True) in a sandbox you trust)"
        )
    if others:
        raise CheckpointError(
            f"{folder} has {', '.join(others[:3])} but neither {SINGLE_FILE} nor {INDEX_FILE}; "
            f"add the index (weight_map) or rename a single file to {SINGLE_FILE}"
        )
    raise CheckpointError(f"{folder} has no weights: expected {SINGLE_FILE} or {INDEX_FILE}")


def quantization_config(folder: Path) -> dict[str, Any] | None:
    """config.json's `quantization_config` table, None when the folder has no readable one."""
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def _quantized_hint(folder: Path) -> str | None:
    """If config.json declares a quantization method, the reason float tensors are missing."""
    qc = quantization_config(folder)
    if qc is not None:
        return str(qc.get("quant_method") or qc.get("format") or "unknown method")
    return None


def _read_weight_headers(
    folder: Path,
) -> tuple[list[SafetensorsHeader], dict[str, TensorEntry], dict[str, SafetensorsHeader]]:
    """Find the weight files (single or indexed), check each header, and map every tensor to its file."""
    weight_map: dict[str, str] | None
    if (folder / INDEX_FILE).is_file():
        weight_map = _read_index(folder)
        file_names = list(dict.fromkeys(weight_map.values()))
    elif (folder / SINGLE_FILE).exists() or (folder / SINGLE_FILE).is_symlink():
        weight_map = None
        file_names = [SINGLE_FILE]
    else:
        _refuse_pickles(folder)
    what = INDEX_FILE if weight_map else "weights"
    files = {name: Path(os.path.normpath(_resolve_inside(folder, name, what=what))) for name in file_names}
    # "x.safetensors" and "./x.safetensors" name one file: read each real file once.
    headers = [read_header(f) for f in dict.fromkeys(files.values())]

    entries: dict[str, TensorEntry] = {}
    owner: dict[str, SafetensorsHeader] = {}
    for h in headers:
        for name, entry in h.tensors.items():
            if name in owner:
                raise CheckpointError(
                    f"{folder}: tensor {name!r} is stored twice ({owner[name].path.name} and {h.path.name})"
                )
            entries[name], owner[name] = entry, h
    for name, fname in (weight_map or {}).items():
        if name not in owner or owner[name].path != files[fname]:
            raise CheckpointError(
                f"{folder / INDEX_FILE}: weight_map puts {name!r} in {fname} but that file does not hold it"
            )
    return headers, entries, owner


def _check_against_config(
    folder: Path, config: LlamaConfig, entries: dict[str, TensorEntry]
) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies is stored, with that shape and a readable dtype.

    Returns the names/shapes the checkpoint exposes: `expected_shapes`, plus a stored `lm_head.weight`
    when embeddings are tied (some exporters write the copy).
    """
    expected = expected_shapes(config)
    missing = [n for n in expected if n not in entries]
    if missing:
        quant = _quantized_hint(folder)
        if quant is not None:
            raise CheckpointError(
                f"{folder} is already quantized ({quant}) and has no float tensor {missing[0]!r}; "
                "start from the original float checkpoint"
            )
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{folder}: tensor {missing[0]!r} is missing{more}; the checkpoint does not match its config.json"
        )
    if "lm_head.weight" in entries and "lm_head.weight" not in expected:
        expected = {**expected, "lm_head.weight": (config.vocab_size, config.hidden_size)}
    for name, shape in expected.items():
        e = entries[name]
        if e.shape != shape:
            raise CheckpointError(
                f"{folder}: tensor {name!r} has shape {e.shape} but config.json implies {shape}; "
                "the weights and config.json do not belong together"
            )
        if e.dtype not in READABLE_DTYPES:
            raise CheckpointError(
                f"{folder}: tensor {name!r} has dtype {e.dtype}; qkiln reads only F32, F16 and BF16 weights "
                "(start from the float checkpoint)"
            )
    return expected


class Checkpoint:
    """A validated Hugging Face Llama checkpoint on disk; a `model.source.TensorSource`.

    Only the Llama tensors of `expected_shapes(config)` are exposed; extras such as
    `model.layers.N.self_attn.rotary_emb.inv_freq` (old exports) are ignored, listed in `ignored`.
    """

    path: Path
    config: LlamaConfig
    files: list[Path]  # weight files, in index order
    ignored: list[str]  # stored tensors that are not part of the Llama architecture

    def __init__(self, path: Path, config: LlamaConfig, headers: list[SafetensorsHeader], entries: dict[str, TensorEntry],
                 owner: dict[str, SafetensorsHeader], ignored: list[str]):
        # Use `Checkpoint.open`; this only stores what open() validated.
        self.path = path
        self.config = config
        self.files = [h.path for h in headers]
        self.ignored = ignored
        self._headers = headers
        self._entries = entries
        self._owner = owner

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        """Validate config, weight files, headers, names, shapes and dtypes; read no tensor data."""
        folder = Path(path)
        if not folder.exists():
            raise CheckpointError(f"{folder} does not exist; pass a Hugging Face checkpoint folder")
        if not folder.is_dir():
            hint = " (import a GGUF with `qkiln import-gguf` first)" if folder.suffix == ".gguf" else ""
            raise CheckpointError(
                f"{folder} is not a folder; pass the checkpoint folder holding config.json and model.safetensors{hint}"
            )
        if not (folder / "config.json").is_file():
            raise CheckpointError(
                f"{folder} has no config.json; a Hugging Face checkpoint folder needs config.json beside its weights"
            )
        config = LlamaConfig.from_file(folder / "config.json")

        headers, entries, owner = _read_weight_headers(folder)
        expected = _check_against_config(folder, config, entries)
        ignored = sorted(set(entries) - set(expected))
        kept = {n: entries[n] for n in sorted(expected)}
        return cls(folder, config, headers, kept, {n: owner[n] for n in kept}, ignored)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self._entries)} tensors in {len(self.files)} file(s))"

    # -- TensorSource ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        """The Llama tensors stored, sorted by name (ignored extras are not listed)."""
        return list(self._entries)

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a tensor of {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> str:
        """The stored dtype: "F32", "F16" or "BF16"."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes the tensor occupies on disk."""
        return self._entry(name).nbytes

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32, read from disk now; F32 is a read-only view of the mapped file.

        BF16/F16 are read a block at a time into the float32 result (`os.pread`, not a mapping, so the
        file's pages never count in this process's resident memory): peak memory is the float32 copy.
        """
        e = self._checked_entry(name)
        if e.numel == 0:
            return np.zeros(e.shape, dtype=np.float32)
        if e.dtype == "F32":
            raw = np.memmap(self._owner[name].path, dtype=READABLE_DTYPES[e.dtype], mode="r", offset=e.offset,
                            shape=e.shape)
            return np.asarray(raw)  # (shape) float32, read-only view
        return self._read_rows(name, 0, e.shape[0] if e.shape else 1).reshape(e.shape)

    def lazy(self, name: str) -> np.ndarray | LazyRows:
        """A 2-D tensor as `LazyRows` (read a block of rows at a time when used); others as `tensor()`."""
        e = self._checked_entry(name)
        if len(e.shape) != 2 or e.numel == 0:
            return self.tensor(name)
        return LazyRows((e.shape[0], e.shape[1]), lambda r0, r1, out=None: self._read_rows(name, r0, r1, out))

    def _checked_entry(self, name: str) -> TensorEntry:
        e = self._entry(name)
        header = self._owner[name]
        try:
            size = os.stat(header.path).st_size
        except OSError as err:
            raise CheckpointError(f"{header.path}: cannot read ({err.strerror or err})") from None
        if size != header.file_size:
            # Mapping or reading a file that shrank would SIGBUS or come up short instead of raising.
            raise CheckpointError(f"{header.path} changed size since the checkpoint was opened; open it again")
        return e

    def _read_rows(self, name: str, r0: int, r1: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows r0:r1 of a tensor (its first dimension) as float32, into `out` (a fresh array by default),
        read with `os.pread` READ_FLOATS values at a time (the only memory besides `out`)."""
        e = self._entry(name)
        raw_dtype = np.dtype(READABLE_DTYPES[e.dtype])
        row_elems = math.prod(e.shape[1:])
        shape = (r1 - r0, *e.shape[1:])
        out = np.empty(shape, np.float32) if out is None else out
        flat = out.reshape(-1)
        path = self._owner[name].path
        fd = os.open(path, os.O_RDONLY)
        try:
            base = e.offset + r0 * row_elems * raw_dtype.itemsize
            for i0 in range(0, flat.size, READ_FLOATS):
                dst = flat[i0 : i0 + READ_FLOATS]
                raw = dst if e.dtype == "F32" else np.empty(dst.size, raw_dtype)
                buf = memoryview(raw.view(np.uint8))  # type: ignore[arg-type]
                done, at = 0, base + i0 * raw_dtype.itemsize
                while done < raw.nbytes:
                    got = os.preadv(fd, [buf[done:]], at + done)
                    if got <= 0:
                        raise CheckpointError(f"{path}: ends inside tensor {name}; the file is truncated")
                    done += got
                if e.dtype == "F16":
                    dst[:] = raw
                elif e.dtype == "BF16":  # the top half of a float32
                    widen(raw.view(BF16), out=dst)
        finally:
            os.close(fd)
        return out

    # -- tokenizer --------------------------------------------------------------------------------

    def tokenizer_path(self) -> Path:
        """`tokenizer.json` (the fast-tokenizer file); CheckpointError if the checkpoint has none."""
        path = self.path / "tokenizer.json"
        if not path.exists():
            raise CheckpointError(
                f"{self.path} has no tokenizer.json; copy it from the original model (only fast tokenizers are read)"
            )
        return _resolve_inside(self.path, "tokenizer.json", what="tokenizer")

    def tokenizer(self) -> tokenizers.Tokenizer:
        import tokenizers

        path = self.tokenizer_path()
        try:
            return tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises bare Exception on malformed files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"{path} cannot be loaded by the tokenizers library ({first})") from None

    # -- summary ----------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What `qkiln info` shows: architecture, sizes, parameter count, dtypes, tokenizer presence."""
        c = self.config
        dtypes: dict[str, int] = {}  # stored dtype -> parameters in it
        for e in self._entries.values():
            dtypes[e.dtype] = dtypes.get(e.dtype, 0) + e.numel
        n_params = sum(e.numel for e in self._entries.values())
        layer0 = "model.layers.0."
        shapes = {
            "embed_tokens": self.shape("model.embed_tokens.weight"),
            "lm_head": self.shape("lm_head.weight") if "lm_head.weight" in self._entries else "tied to embed_tokens",
        }
        for short in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            shapes[short.split(".")[1]] = self.shape(f"{layer0}{short}.weight")
        return {
            "path": str(self.path),
            "architecture": c.architecture,
            "num_hidden_layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "max_position_embeddings": c.max_position_embeddings,
            "rope_theta": c.rope_theta,
            "rope_scaling": None if c.rope_scaling is None else {"rope_type": "llama3", **dataclasses.asdict(c.rope_scaling)},
            "rope": Rope(c.rope_theta, c.rope_scaling).describe(),
            "tie_word_embeddings": c.tie_word_embeddings,
            "parameters": n_params,
            "tensors": len(self._entries),
            "ignored_tensors": self.ignored,
            "dtype_parameters": dtypes,
            "bytes": sum(e.nbytes for e in self._entries.values()),
            "files": [f.name for f in self.files],
            "shapes": shapes,
            "tokenizer": (self.path / "tokenizer.json").is_file(),
        }
