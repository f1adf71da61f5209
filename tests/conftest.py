"""Shared fixtures: a tiny Llama config, seeded random weights, and checkpoint folders written to tmp_path.

Fixtures return factories so a test states only what it changes:

    def test_x(tiny_config, make_checkpoint, llama_weights):
        cfg = tiny_config(num_hidden_layers=1)
        ckpt = make_checkpoint(cfg, dtype="BF16", shards=2)       # a Path
        expected = llama_weights(cfg, dtype="BF16")               # float32 values exactly as stored

The tokenizer is a byte-level BPE trained deterministically on generated text, with exactly
`config.vocab_size` tokens (`<unk>` 0, `<s>` 1, `</s>` 2), so tests can tokenize real strings.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from qkiln.model.config import LlamaConfig

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
STORAGE_DTYPES: dict[str, Any] = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """vocab 512, hidden 64, intermediate 128, 2 layers, 4 heads, 2 KV heads (head_dim 16), untied."""
    fields: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 256,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    fields.update(overrides)
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return LlamaConfig(**fields)


def random_llama_weights(config: LlamaConfig, *, seed: int = 0, dtype: str = "F32") -> dict[str, np.ndarray]:
    """Seeded weights for every tensor of `config`, rounded to `dtype` and returned as float32.

    Scales keep activations O(1) through the layers (projections ~ N(0, 1/fan_in), norms ~ 1), so
    logits are not flat and top-1 comparisons mean something.
    """
    from qkiln.formats.hf import expected_shapes

    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in sorted(expected_shapes(config).items()):
        if len(shape) == 1:
            w = 1.0 + 0.1 * rng.standard_normal(shape)  # RMSNorm gains
        elif name == "model.embed_tokens.weight":
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / math.sqrt(shape[1])
        out[name] = w.astype(STORAGE_DTYPES[dtype]).astype(np.float32)
    return out


def _corpus(seed: int = 0) -> list[str]:
    """English-ish lines of common words and invented syllable words, with numbers and punctuation."""
    words = (
        "the of and to a in is that for it as with was on be by this are from or at an not have which "
        "model weight layer quantize token scale group block tensor kernel cache memory speed accuracy"
    ).split()
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    invented = ["".join(rng.choice(syllables, size=k)) for k in rng.integers(1, 4, size=3000)]
    pool = words * 20 + invented
    idx = rng.integers(0, len(pool), size=30000)
    return [" ".join(pool[j] for j in idx[i : i + 15]).capitalize() + f", {i % 1000}." for i in range(0, len(idx), 15)]


@functools.lru_cache(maxsize=8)
def tiny_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE `tokenizer.json` with exactly `vocab_size` tokens (cached per size, ~0.2 s to build)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    short = vocab_size - tok.get_vocab_size()
    if short > 0:  # the corpus ran out of merges: pad with unused special tokens so ids match the embedding rows
        tok.add_special_tokens([f"<extra_{i}>" for i in range(short)])
    assert tok.get_vocab_size() == vocab_size
    return tok.to_str()


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "add_bos_token": False,
    "model_max_length": 256,
}


def _tokenizer_files(config: LlamaConfig) -> dict[str, str]:
    return {
        "tokenizer.json": tiny_tokenizer_json(config.vocab_size),
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, indent=2, sort_keys=True) + "\n",
    }


def write_sharded(dest: Path, config: LlamaConfig, arrays: Mapping[str, np.ndarray], shards: int,
                  extra_files: Mapping[str, str]) -> Path:
    """A checkpoint split into `shards` files named like transformers names them, with its index."""
    from safetensors.numpy import save_file

    names = sorted(arrays)
    groups = [list(g) for g in np.array_split(np.array(names, dtype=object), shards)]
    dest.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{shards:05d}.safetensors"
        save_file({n: np.ascontiguousarray(arrays[n]) for n in group}, str(dest / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    index = {"metadata": {"total_size": int(sum(a.nbytes for a in arrays.values()))}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (dest / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")
    for fname, text in extra_files.items():
        (dest / fname).write_text(text, encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def tokenizer_files() -> Callable[[int], dict[str, str]]:
    """`tokenizer_files(vocab_size)`: file name -> text of the tiny tokenizer, for folders a test saves itself."""
    return lambda vocab_size: _tokenizer_files(tiny_llama_config(vocab_size=vocab_size))


@pytest.fixture
def tiny_config() -> Callable[..., LlamaConfig]:
    """`tiny_config(**overrides) -> LlamaConfig` (see `tiny_llama_config` for the defaults)."""
    return tiny_llama_config


@pytest.fixture
def llama_weights() -> Callable[..., dict[str, np.ndarray]]:
    """`llama_weights(config, seed=0, dtype="F32")`: the float32 values `make_checkpoint` stores."""
    return lambda config, seed=0, dtype="F32": random_llama_weights(config, seed=seed, dtype=dtype)


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """`make_checkpoint(config=None, *, dtype="F32", shards=1, tied=None, tokenizer=True, seed=0,
    drop=(), extra=None, name="ckpt") -> Path`: write a seeded random Llama checkpoint folder.

    `dtype` is the storage dtype (F32/F16/BF16); `shards > 1` writes `model-0000i-of-0000N.safetensors`
    plus `model.safetensors.index.json`; `tied` overrides `config.tie_word_embeddings` (a tied checkpoint
    stores no lm_head); `drop` leaves tensors out and `extra` adds or replaces tensors (any array, stored
    as given) to make bad checkpoints. The folder is `tmp_path / name`.
    """

    def make(
        config: LlamaConfig | None = None,
        *,
        dtype: str = "F32",
        shards: int = 1,
        tied: bool | None = None,
        tokenizer: bool = True,
        seed: int = 0,
        drop: Iterable[str] = (),
        extra: Mapping[str, np.ndarray] | None = None,
        name: str = "ckpt",
    ) -> Path:
        from qkiln.formats.hf_write import write_checkpoint

        cfg = config if config is not None else tiny_llama_config()
        if tied is not None:
            cfg = dataclasses.replace(cfg, tie_word_embeddings=tied)
        values = random_llama_weights(cfg, seed=seed, dtype=dtype)
        arrays: dict[str, np.ndarray] = {n: v.astype(STORAGE_DTYPES[dtype]) for n, v in values.items()}
        for n in drop:
            arrays.pop(n)
        arrays.update(extra or {})
        files = _tokenizer_files(cfg) if tokenizer else {}
        dest = tmp_path / name
        if shards > 1:
            return write_sharded(dest, cfg, arrays, shards, files)
        return write_checkpoint(dest, cfg, sorted(arrays.items()), extra_files=files)

    return make


# -- bad checkpoints: one per defect, with the message a reader must give (a regex) -----------------

BAD_CHECKPOINTS: dict[str, str] = {
    "truncated": r"model\.safetensors: file is truncated: data section has \d+ bytes but tensor '.+' ends at \d+",
    "header_too_long": r"model\.safetensors: header length \d+ is larger than the file \(\d+ bytes\)",
    "index_escapes": r"names file '\.\./outside\.safetensors', which is outside the checkpoint folder",
    "missing_tensor": r"tensor 'model\.layers\.1\.self_attn\.v_proj\.weight' is missing",
    "wrong_shape": r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(128, 64\) but config\.json implies \(64, 128\)",
    "unsupported_arch": r"architecture 'GPT2LMHeadModel' is not supported",
    "pickle_only": r"holds only pickled weights \(pytorch_model\.bin\); loading a pickle runs arbitrary code.*convert the checkpoint to safetensors",
    "not_a_folder": r"is not a folder",
    "no_config": r"has no config\.json",
}


class _RunsCode:
    """Unpickling this creates the file `marker`: proof that a reader never unpickles."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def build_bad_checkpoint(make: Callable[..., Path], tmp_path: Path, kind: str) -> Path:
    """A checkpoint folder (or path) with exactly the defect `kind` names (a key of BAD_CHECKPOINTS)."""
    if kind == "truncated":
        path = make(name=kind, tokenizer=False)
        f = path / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])
    elif kind == "header_too_long":
        path = make(name=kind, tokenizer=False)
        f = path / "model.safetensors"
        blob = f.read_bytes()
        f.write_bytes((len(blob) + 1000).to_bytes(8, "little") + blob[8:])
    elif kind == "index_escapes":
        path = make(name=kind, shards=2, tokenizer=False)
        index_path = path / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        first = sorted(index["weight_map"])[0]
        real = path / index["weight_map"][first]
        (tmp_path / "outside.safetensors").write_bytes(real.read_bytes())  # it exists; still refused
        index["weight_map"][first] = "../outside.safetensors"
        index_path.write_text(json.dumps(index))
    elif kind == "missing_tensor":
        path = make(name=kind, drop=["model.layers.1.self_attn.v_proj.weight"], tokenizer=False)
    elif kind == "wrong_shape":
        path = make(name=kind, extra={"model.layers.0.mlp.down_proj.weight": np.zeros((128, 64), np.float32)},
                    tokenizer=False)
    elif kind == "unsupported_arch":
        path = make(name=kind, tokenizer=False)
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
        (path / "config.json").write_text(json.dumps(cfg))
    elif kind == "pickle_only":
        import pickle

        path = tmp_path / kind
        path.mkdir()
        (path / "config.json").write_text(json.dumps(tiny_llama_config().to_dict()))
        (path / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(tmp_path / "UNPICKLED")))
    elif kind == "not_a_folder":
        path = tmp_path / "model.safetensors"
        path.write_bytes(b"\0" * 16)
    elif kind == "no_config":
        path = make(name=kind, tokenizer=False)
        (path / "config.json").unlink()
    else:
        raise KeyError(kind)
    return path


@pytest.fixture
def bad_checkpoint(make_checkpoint: Callable[..., Path], tmp_path: Path) -> BadCheckpoints:
    """`bad_checkpoint(kind) -> Path` for each kind in BAD_CHECKPOINTS; `bad_checkpoint.message(kind)` its regex.

    For "pickle_only", `tmp_path / "UNPICKLED"` appears if anything ever unpickles the weights.
    """
    return BadCheckpoints(make_checkpoint, tmp_path)


class BadCheckpoints:
    """Callable `(kind) -> Path`; `.message(kind)` is the regex the error must match."""

    kinds = tuple(BAD_CHECKPOINTS)

    def __init__(self, make: Callable[..., Path], tmp_path: Path):
        self._make, self._tmp = make, tmp_path

    def __call__(self, kind: str) -> Path:
        return build_bad_checkpoint(self._make, self._tmp, kind)

    @staticmethod
    def message(kind: str) -> str:
        return BAD_CHECKPOINTS[kind]


# -- tiny llama GGUF files (GGUF import tests) --------------------------------------------------------

GGUF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
GGUF_MERGES = ("Ġ t", "h e", "Ġt he")


def _byte_level_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


# Default GGML type per GGUF tensor role: K-quants, legacy blocks, F16/BF16/F32 all represented.
GGUF_TINY_TYPES = {
    "token_embd": "Q8_0", "attn_norm": "F32", "ffn_norm": "F32", "output_norm": "F32",
    "attn_q": "Q4_0", "attn_k": "Q4_K", "attn_v": "Q5_0", "attn_output": "F16",
    "ffn_gate": "Q4_1", "ffn_up": "BF16", "ffn_down": "Q6_K", "output": "Q8_0",
}


def _gguf_blocks(x: np.ndarray, type_name: str) -> np.ndarray:
    """x (rows, cols) float32 -> GGUF bytes of `type_name`. gguf-py cannot quantize K-quants: qkiln's own
    quantizer does (its RTN bytes equal llama.cpp's), so every tensor holds x on that grid, with the weight
    magnitudes and zero-centred mins of a real file (random block bytes would give a Q2_K weight up to 0.9 with
    a large positive mean, a Q5_K one up to 40: a model no runtime comparison can judge)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[type_name]
    if qtype == gguf.GGMLQuantizationType.F32:
        return x.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return x.astype(np.float16)
    try:
        return gguf.quants.quantize(x, qtype)
    except NotImplementedError:
        if not type_name.endswith("_K"):
            raise
        from qkiln.quantize.ggml_pack import pack_blocks
        from qkiln.quantize.registry import get_scheme
        from qkiln.quantize.rtn import quantize_rtn

        rows = x.reshape(-1, x.shape[-1])
        return pack_blocks(quantize_rtn(rows, get_scheme(type_name.lower()))).reshape(*x.shape[:-1], -1)


def write_tiny_llama_gguf(
    path: Path,
    *,
    arch: str = "llama",
    types: Mapping[str, str] | None = None,
    tied: bool = False,
    seed: int = 0,
    pre: str = "smollm",
    hidden: int = 256,
    intermediate: int = 512,
    n_layers: int = 2,
    n_head: int = 4,
    n_head_kv: int = 2,
    extra_meta: Callable[[Any], None] | None = None,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """A small llama GGUF written with gguf.GGUFWriter: byte-level BPE vocabulary (262 tokens, control
    tokens 0-2), seeded random weights in the GGML types of `types` (defaults GGUF_TINY_TYPES). The
    q/k rows are stored as they come from the rng: tests compare against gguf-py's own reading."""
    import gguf

    kinds = {**GGUF_TINY_TYPES, **(types or {})}
    tokens = [*GGUF_SPECIALS, *_byte_level_alphabet(), *(m.replace(" ", "") for m in GGUF_MERGES)]
    vocab, head_dim = len(tokens), hidden // n_head
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(intermediate)
    w.add_block_count(n_layers)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3] * len(GGUF_SPECIALS) + [1] * (vocab - len(GGUF_SPECIALS)))
    w.add_token_merges(list(GGUF_MERGES))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    if extra_meta is not None:
        extra_meta(w)
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,)}
    if not tied:
        shapes["output"] = (vocab, hidden)
    for b in range(n_layers):
        shapes |= {f"blk.{b}.attn_norm": (hidden,), f"blk.{b}.attn_q": (n_head * head_dim, hidden),
                   f"blk.{b}.attn_k": (n_head_kv * head_dim, hidden), f"blk.{b}.attn_v": (n_head_kv * head_dim, hidden),
                   f"blk.{b}.attn_output": (hidden, n_head * head_dim), f"blk.{b}.ffn_norm": (hidden,),
                   f"blk.{b}.ffn_gate": (intermediate, hidden), f"blk.{b}.ffn_up": (intermediate, hidden),
                   f"blk.{b}.ffn_down": (hidden, intermediate)}
    for name, shape in shapes.items():
        kind = kinds[name.split(".")[-1]]
        x = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
             else rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
        data = _gguf_blocks(x, kind)
        raw_dtype = None if kind in ("F32", "F16") else gguf.GGMLQuantizationType[kind]
        w.add_tensor(f"{name}.weight", data, raw_dtype=raw_dtype)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def make_gguf(tmp_path: Path) -> Callable[..., Path]:
    """`make_gguf(name="tiny.gguf", **kw) -> Path`: a tiny llama GGUF (see write_tiny_llama_gguf)."""

    def make(name: str = "tiny.gguf", **kw: Any) -> Path:
        return write_tiny_llama_gguf(tmp_path / name, **kw)

    return make


# --- hypothesis: derandomized, so CI runs the same examples every time (SCHEMES helper) -------------
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:
    _hypothesis_settings.register_profile(
        "qkiln",
        derandomize=True,
        deadline=None,
        max_examples=60,
        suppress_health_check=[HealthCheck.too_slow],
        print_blob=True,
    )
    _hypothesis_settings.load_profile("qkiln")
