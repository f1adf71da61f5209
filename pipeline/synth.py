"""A synthetic checkpoint of a real model's shape: random BF16 weights, the real config, a tokenizer that fits.

What it is for: tests and benchmarks at the shapes users quantize (an 8B Llama is 16 GB in BF16) without a
model hub. The folder is what `huggingface_hub` would download — sharded BF16 safetensors with their index,
`config.json` (the model's own, `torch_dtype: bfloat16`), `generation_config.json`, and the demo model's
tokenizer with its vocabulary padded to the config's `vocab_size` by Llama 3's reserved special tokens — so
every qkiln reader (formats.hf.Checkpoint, the GGUF tokenizer export) and transformers take it as it is.

Streaming: each tensor is generated when the safetensors writer asks for it (`safetensors_write`'s producer
form), so memory is about one tensor in BF16 (an 8B model's embedding, 1.05 GB) plus one generation chunk;
the disk, not memory, bounds the model's size.

Deterministic: a tensor's bytes depend only on (seed, tensor name, shape): each tensor has its own NumPy
Generator seeded from sha256(seed, name), and its rows are drawn in fixed-size chunks. They do not depend on
the order tensors are written in, on the shard size, or on `--layers`: a 2-layer model's tensors are the
first two layers of the full one, byte for byte.

Scale (why the activations stay realistic through every layer): linears and embeddings ~ N(0, 0.02²), norms
ones, and the two residual-branch outputs (o_proj, down_proj) ~ N(0, (0.02 / sqrt(2 · depth))²), as GPT-2 and
Megatron initialise them, `depth` being the real model's layer count (not `--layers`, so the bytes stay
independent of it). Each layer then adds a variance of about c²/(2·depth) to the residual stream, so the
hidden-state RMS grows like sqrt(layer / depth) towards a bounded value instead of compounding
(tests/pipeline/test_synth.py measures it through the NumPy runtime).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qkiln.atomic import atomic_dir
from qkiln.demo import demo_model_dir
from qkiln.errors import UserError
from qkiln.formats.safetensors_folder import DEFAULT_SHARD_BYTES, INDEX_FILE, dump_json
from qkiln.formats.safetensors_write import write_safetensors
from qkiln.model.config import LlamaConfig
from qkiln.model.names import expected_shapes

BF16 = np.dtype(ml_dtypes.bfloat16)
INIT_STD = 0.02  # transformers' Llama initializer_range, GPT-2's and Megatron's init
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")
CHUNK_ELEMENTS = 1 << 23  # rows are drawn in chunks of about 8 Mi values: 32 MB of float32 scratch

# Llama 3's tokenizer: 128000 byte-level BPE tokens, then 256 special tokens, of which these two have names in
# every Llama 3 release; the rest are `<|reserved_special_token_N|>` (or chat markers in the Instruct models).
LLAMA3_SPECIALS = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>"}


def _llama3(hidden: int, inter: int, layers: int, heads: int, kv_heads: int, factor: float, tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": INIT_STD,
        "intermediate_size": inter,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0,
        "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": 128256,
    }


def _demo_config() -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads((demo_model_dir() / "config.json").read_text(encoding="utf-8"))
    return {**cfg, "torch_dtype": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Shape:
    """A real model's shape: its config.json (made when asked: the demo's is read from the imported model)."""

    name: str
    about: str  # the model and where its numbers were checked
    config: Callable[[], dict[str, Any]]
    specials: Mapping[int, str] = dataclasses.field(default_factory=dict)  # named special token ids


SHAPES: dict[str, Shape] = {s.name: s for s in (
    # meta-llama/Llama-3.1-8B config.json (as mirrored on the hub, e.g. NbAiLab/nb-llama-3.1-8B,
    # mlx-community/Meta-Llama-3.1-8B-bf16): Llama 3 8B's shape with 3.1's llama3 rope scaling.
    Shape("llama-3-8b", "Llama-3.1-8B: 4096 hidden, 32 layers, 32/8 heads, 14336 MLP, 128256 vocab, llama3 rope x8",
          lambda: _llama3(4096, 14336, 32, 32, 8, 8.0, tied=False), LLAMA3_SPECIALS),
    # meta-llama/Llama-3.2-1B config.json (hub mirrors unsloth/Llama-3.2-1B, julien-c/Llama-3.2-1B-Instruct).
    Shape("llama-3.2-1b", "Llama-3.2-1B: 2048 hidden, 16 layers, 32/8 heads, 8192 MLP, 128256 vocab, tied, llama3 rope x32",
          lambda: _llama3(2048, 8192, 16, 32, 8, 32.0, tied=True), LLAMA3_SPECIALS),
    Shape("smollm2-135m", "SmolLM2-135M-Instruct, the demo model's own config.json", _demo_config),
)}


def shape_names() -> list[str]:
    return list(SHAPES)


def synth_config(name: str, *, layers: int | None = None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config.json of shape `name`, with `layers` decoder layers (default: the model's own) and any other
    keys replaced by `overrides` (tests make width-reduced variants this way)."""
    if name not in SHAPES:
        raise UserError(f"unknown --config {name!r}; choose one of {', '.join(SHAPES)}")
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise UserError(f"--layers {layers!r}: a model needs at least one decoder layer; pass --layers 1 or more")
    cfg = {**SHAPES[name].config(), **(overrides or {})}
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    LlamaConfig.from_dict(cfg, source=f"synth config {name}")  # the readers must accept what is written
    return cfg


def residual_depth(name: str, overrides: Mapping[str, Any] | None = None) -> int:
    """The layer count the residual-branch outputs are scaled for: the real model's, whatever `--layers` says."""
    return int({**SHAPES[name].config(), **(overrides or {})}["num_hidden_layers"])


def synth_weight_bytes(name: str, *, layers: int | None = None, overrides: Mapping[str, Any] | None = None) -> int:
    """Bytes of the BF16 weights `write_synth` would write."""
    cfg = LlamaConfig.from_dict(synth_config(name, layers=layers, overrides=overrides))
    return sum(math.prod(s) for s in expected_shapes(cfg).values()) * BF16.itemsize


def init_std(tensor: str, depth: int) -> float:
    """Standard deviation of a weight (0 for the norms, which are ones)."""
    if tensor.endswith("norm.weight"):
        return 0.0
    if tensor.endswith(RESIDUAL_OUTPUTS):
        return INIT_STD / math.sqrt(2 * depth)
    return INIT_STD


def _rng(seed: int, tensor: str) -> np.random.Generator:
    digest = hashlib.sha256(f"qkiln-synth:{seed}:{tensor}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def synth_tensor(tensor: str, shape: tuple[int, ...], seed: int, depth: int) -> np.ndarray:
    """One weight in BF16, the same bytes for the same (seed, name, shape, depth) whatever else is made.

    Drawn in chunks of whole rows (float32 normals, scaled, rounded to BF16 to nearest-even) into the one BF16
    array returned: memory is the tensor plus one chunk, never a float32 or float64 copy of it."""
    std = init_std(tensor, depth)
    if std == 0.0:
        return np.ones(shape, dtype=BF16)
    out = np.empty(shape, dtype=BF16)  # (rows, cols) or (n,)
    flat = out.reshape(shape[0], -1)  # (rows, cols) view
    rows_per = max(1, CHUNK_ELEMENTS // flat.shape[1])
    rng = _rng(seed, tensor)
    for r0 in range(0, flat.shape[0], rows_per):
        chunk = rng.standard_normal((min(rows_per, flat.shape[0] - r0), flat.shape[1]), dtype=np.float32)
        chunk *= np.float32(std)
        flat[r0 : r0 + chunk.shape[0]] = chunk.astype(BF16)
    return out


class SynthSource:
    """The synthetic weights as a `model.source.TensorSource`, generated on demand and never written: the
    runtime can run the exact model `write_synth` would write (float32 of the same BF16 values)."""

    def __init__(self, name: str, *, seed: int = 0, layers: int | None = None, overrides: Mapping[str, Any] | None = None):
        self.config_dict = synth_config(name, layers=layers, overrides=overrides)
        self.config = LlamaConfig.from_dict(self.config_dict)
        self.seed, self.depth = seed, residual_depth(name, overrides)
        self._shapes = expected_shapes(self.config)

    def names(self) -> list[str]:
        return list(self._shapes)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return self._shapes[tensor]

    def bf16(self, tensor: str) -> np.ndarray:
        return synth_tensor(tensor, self._shapes[tensor], self.seed, self.depth)

    def tensor(self, tensor: str) -> np.ndarray:
        return self.bf16(tensor).astype(np.float32)


# -- tokenizer -------------------------------------------------------------------------------------------


def _added(token_id: int, content: str) -> dict[str, Any]:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def padded_tokenizer(source: Path, vocab_size: int, specials: Mapping[int, str]) -> dict[str, Any]:
    """`source`'s tokenizer.json with ids len(vocabulary)..vocab_size-1 added as special tokens: the named ones
    of `specials`, the others `<|reserved_special_token_N|>` numbered from 0, as Llama 3 names its unused ids."""
    tok: dict[str, Any] = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    ids = set(tok["model"]["vocab"].values()) | {a["id"] for a in tok.get("added_tokens", [])}
    base = max(ids) + 1
    if base > vocab_size:
        raise UserError(f"the demo tokenizer has {base} tokens, more than this shape's vocab_size {vocab_size}")
    taken = set(tok["model"]["vocab"]) | {a["content"] for a in tok.get("added_tokens", [])}
    added = list(tok.get("added_tokens", []))
    n = 0
    for i in range(base, vocab_size):
        if i in specials:
            content = specials[i]
        else:
            content, n = f"<|reserved_special_token_{n}|>", n + 1
        assert content not in taken, content  # the demo vocabulary has none of Llama 3's special tokens
        added.append(_added(i, content))
    return {**tok, "added_tokens": added}


def _token_name(tok: dict[str, Any], token_id: Any) -> str | None:
    if not isinstance(token_id, int):
        return None
    for a in tok["added_tokens"]:
        if a["id"] == token_id:
            return str(a["content"])
    return next((t for t, i in tok["model"]["vocab"].items() if i == token_id), None)


def _tokenizer_files(cfg: Mapping[str, Any], specials: Mapping[int, str]) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json for `cfg`:
    the demo model's, padded to the config's vocabulary, with bos/eos naming the config's ids."""
    demo = demo_model_dir()
    tok = padded_tokenizer(demo, int(cfg["vocab_size"]), {i: s for i, s in specials.items() if i < cfg["vocab_size"]})
    names = {k: _token_name(tok, cfg.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
    for k in ("bos", "eos"):
        if cfg.get(f"{k}_token_id") is not None and names[k] is None:
            raise UserError(f"{k}_token_id {cfg[f'{k}_token_id']} is not in the synthetic tokenizer")
    tok_cfg = json.loads((demo / "tokenizer_config.json").read_text(encoding="utf-8"))
    smap = json.loads((demo / "special_tokens_map.json").read_text(encoding="utf-8"))
    for k, v in names.items():
        if v is not None:
            tok_cfg[f"{k}_token"] = smap[f"{k}_token"] = v
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg.get(k) is not None}
    return {
        "tokenizer.json": json.dumps(tok, ensure_ascii=False, indent=2) + "\n",
        "tokenizer_config.json": dump_json(tok_cfg),
        "special_tokens_map.json": dump_json(smap),
        "generation_config.json": dump_json(gen),
    }


# -- the folder ------------------------------------------------------------------------------------------


def plan_shards(shapes: Mapping[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    """Tensors (in checkpoint order) cut into shards of at most `shard_bytes` BF16 bytes; a tensor larger than
    that has a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * BF16.itemsize
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


@dataclasses.dataclass(frozen=True)
class SynthResult:
    path: Path
    shape: str
    config: dict[str, Any]
    seed: int
    shards: list[str]
    n_params: int
    weight_bytes: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "config": self.shape, "layers": self.config["num_hidden_layers"],
                "seed": self.seed, "shards": self.shards, "parameters": self.n_params,
                "weight_bytes": self.weight_bytes, "seconds": round(self.seconds, 2)}


def write_synth(
    dest: str | Path,
    name: str,
    *,
    seed: int = 0,
    layers: int | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> SynthResult:
    """Write the synthetic checkpoint of shape `name` to the folder `dest`, atomically; `progress(tensor,
    bytes)` after each tensor is generated."""
    t0 = time.perf_counter()
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"output {dest} is a file; pass a folder to write the checkpoint into (-o DIR)")
    if shard_bytes < 1:
        raise UserError(f"--shard-size must be positive, got {shard_bytes} bytes")
    source = SynthSource(name, seed=seed, layers=layers, overrides=overrides)
    cfg = source.config_dict
    shapes = expected_shapes(source.config)
    weight_bytes = sum(math.prod(s) for s in shapes.values()) * BF16.itemsize
    parent = dest.resolve().parent
    free = shutil.disk_usage(parent).free if parent.is_dir() else None  # a missing folder: atomic_dir says so
    if free is not None and weight_bytes + 2**26 > free:
        raise UserError(f"{name} needs {weight_bytes / 1e9:.2f} GB on disk but {parent} has "
                        f"{free / 1e9:.2f} GB free; free space or pass --layers N for fewer layers")
    files = _tokenizer_files(cfg, SHAPES[name].specials)
    plan = plan_shards(shapes, shard_bytes)
    fnames = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]

    def producer(tensor: str) -> Callable[[], np.ndarray]:
        def make() -> np.ndarray:
            arr = source.bf16(tensor)
            if progress is not None:
                progress(tensor, arr.nbytes)
            return arr
        return make

    with atomic_dir(dest, overwrite=overwrite) as tmp:
        for fname, names in zip(fnames, plan, strict=True):
            write_safetensors(tmp / fname, {t: (BF16, shapes[t], producer(t)) for t in names}, metadata={"format": "pt"})
        weight_map = {t: fname for fname, names in zip(fnames, plan, strict=True) for t in names}
        index = {"metadata": {"total_size": weight_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(dump_json(index))
        (tmp / "config.json").write_text(dump_json(cfg))
        for fname, text in files.items():
            (tmp / fname).write_text(text, encoding="utf-8")
    n_params = sum(math.prod(s) for s in shapes.values())
    return SynthResult(dest, name, cfg, seed, fnames, n_params, weight_bytes, time.perf_counter() - t0)
