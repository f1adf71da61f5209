"""The Llama architecture's hyper-parameters, parsed from a Hugging Face `config.json`.

One frozen dataclass shared by the checkpoint reader, the GGUF importer/writer and the NumPy runtime.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from qkiln.errors import CheckpointError

# Architectures whose weights and forward pass are Llama's (same tensor names, same math).
LLAMA_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM"})


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """`rope_scaling` of type `llama3` (Llama 3.1+): frequencies rescaled by wavelength band."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotary embedding a config asks for, whichever form transformers wrote it in."""

    theta: float
    scaling: RopeScaling | None = None  # None: plain RoPE ("default")

    def describe(self) -> str:
        if self.scaling is None:
            return f"default rope (theta {self.theta:g})"
        s = self.scaling
        return (f"llama3 rope (theta {self.theta:g}, factor {s.factor:g}, low_freq_factor {s.low_freq_factor:g}, "
                f"high_freq_factor {s.high_freq_factor:g}, original_max_position_embeddings "
                f"{s.original_max_position_embeddings})")


# What transformers 5.25 uses for a key absent from config.json (its LlamaConfig / MistralConfig class
# defaults); None: derived from the head count.
_ABSENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "num_key_value_heads": None},
    "MistralForCausalLM": {"rms_norm_eps": 1e-6, "max_position_embeddings": 4096 * 32, "num_key_value_heads": 8},
}
DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
SILU_NAMES = frozenset({"silu", "swish"})  # both are SiLU in transformers' ACT2FN
ROPE_TYPES = ("default", "llama3")  # what the runtime, the GGUF metadata and every writer implement
_ROPE_COMMON_KEYS = frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"})
_LLAMA3_KEYS = frozenset({"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})


def _number(value: Any, key: str, source: str, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
        positive and value <= 0
    ):
        raise CheckpointError(f"{source}: {key} is {value!r}; it must be a {'positive ' if positive else ''}number")
    return float(value)


def _refuse_partial_rotary(value: Any, key: str, source: str) -> None:
    if value is not None and _number(value, key, source) != 1.0:
        raise CheckpointError(
            f"{source}: {key} {value!r} asks for partial rotary embeddings; qkiln rotates the whole head only"
        )


def _refuse_unsupported_math(cfg: dict[str, Any], source: str) -> None:
    """Keys transformers' Llama honours that change the forward pass and that qkiln does not implement."""
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise CheckpointError(
                f"{source}: {key} is {cfg[key]!r}; qkiln's Llama has no bias terms (only {key}: false is supported)"
            )
    act = cfg.get("hidden_act", "silu")
    if act not in SILU_NAMES:
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported; qkiln's MLP is SiLU-gated ('silu')")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and (
        not isinstance(layer_types, list) or any(t != "full_attention" for t in layer_types)
    ):
        odd = next((t for t in layer_types if t != "full_attention"), None) if isinstance(layer_types, list) else None
        raise CheckpointError(
            f"{source}: layer_types {odd if odd is not None else layer_types!r} is not supported; "
            "qkiln runs every layer as 'full_attention'"
        )


def _one_rope(d: dict[str, Any], where: str, cfg: dict[str, Any], source: str, max_pos: int) -> Rope:
    """One flat rope dict (`rope_scaling`, `rope_parameters` or a per-layer-type entry) as transformers 5.25
    standardizes it: `rope_type` (else legacy `type`, else "default"), `rope_theta` (else the top-level
    `rope_theta`, else 10000), llama3's `original_max_position_embeddings` (top-level key first, else the dict's,
    else `max_position_embeddings`)."""
    rope_type, legacy_type = d.get("rope_type"), d.get("type")
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise CheckpointError(f"{source}: {where}.type {legacy_type!r} and {where}.rope_type {rope_type!r} disagree")
    kind = rope_type if rope_type is not None else legacy_type if legacy_type is not None else "default"
    type_key = f"{where}.{'type' if rope_type is None and legacy_type is not None else 'rope_type'}"

    top_theta = cfg.get("rope_theta")
    if "rope_theta" in d:
        theta = _number(d["rope_theta"], f"{where}.rope_theta", source)
        if top_theta is not None and _number(top_theta, "rope_theta", source) != theta:
            # transformers 4 reads the top-level key, transformers 5 the dict's: the checkpoint means two things.
            raise CheckpointError(
                f"{source}: rope_theta {top_theta!r} and {where}.rope_theta {d['rope_theta']!r} disagree; keep one"
            )
    else:
        theta = DEFAULT_ROPE_THETA if top_theta is None else _number(top_theta, "rope_theta", source)
    _refuse_partial_rotary(d.get("partial_rotary_factor"), f"{where}.partial_rotary_factor", source)

    if kind == "linear" and "factor" in d and _number(d["factor"], f"{where}.factor", source) == 1.0:
        kind, known = "default", _ROPE_COMMON_KEYS | {"factor"}  # linear scaling by 1 is plain RoPE
    else:
        known = _ROPE_COMMON_KEYS | (_LLAMA3_KEYS if kind == "llama3" else frozenset())
    if kind not in ROPE_TYPES:
        raise CheckpointError(
            f"{source}: {type_key} {kind!r} is not supported; qkiln implements only {' and '.join(map(repr, ROPE_TYPES))}"
        )
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(
            f"{source}: {where}.{unknown[0]} is not a parameter of {kind!r} rope; qkiln will not guess what it means"
        )
    if kind == "default":
        return Rope(theta)

    def need(key: str) -> float:
        if d.get(key) is None:
            raise CheckpointError(f"{source}: {where}.{key} is missing; llama3 rope scaling needs it")
        return _number(d[key], f"{where}.{key}", source)

    factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
    if not low < high:
        raise CheckpointError(
            f"{source}: {where}.low_freq_factor {low:g} must be below {where}.high_freq_factor {high:g}"
        )
    orig = d.get("original_max_position_embeddings")
    top_orig = cfg.get("original_max_position_embeddings")
    if top_orig is not None:  # transformers 5 lets the top-level key override the dict's
        if orig is not None and top_orig != orig:
            raise CheckpointError(
                f"{source}: original_max_position_embeddings {top_orig!r} and "
                f"{where}.original_max_position_embeddings {orig!r} disagree; keep one"
            )
        orig = top_orig
    orig = max_pos if orig is None else orig
    if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
        raise CheckpointError(f"{source}: {where}.original_max_position_embeddings {orig!r} must be a positive integer")
    return Rope(theta, RopeScaling(factor, low, high, orig))


def parse_rope(cfg: dict[str, Any], source: str = "config.json", *, max_position_embeddings: int = 2048) -> Rope:
    """The rotary embedding of a config.json in any form transformers writes, following its 5.25 rules.

    - 4.x: top-level `rope_theta` and `rope_scaling` (`type` or `rope_type`).
    - 5.x: `rope_parameters` with `rope_type` and `rope_theta` inside; a non-empty `rope_scaling` replaces it.
    - 5.x per layer type: `rope_parameters` entries keyed by the config's `layer_types`. transformers'
      LlamaForCausalLM ignores them and runs the flat keys, so each entry must describe the same rope.

    Where transformers 4 and 5 would read a config differently (a top-level key contradicting the dict's),
    or a key is present that qkiln cannot honour, it raises CheckpointError naming the key: never a silent
    default for a key that is there.
    """
    _refuse_partial_rotary(cfg.get("partial_rotary_factor"), "partial_rotary_factor", source)
    legacy, params = cfg.get("rope_scaling"), cfg.get("rope_parameters")
    for key, d in (("rope_scaling", legacy), ("rope_parameters", params)):
        if d is not None and not isinstance(d, dict):
            raise CheckpointError(f"{source}: {key} must be an object or null, not {type(d).__name__}")
    layer_types = cfg.get("layer_types")
    labels = set(layer_types) if isinstance(layer_types, list) else set()

    def read(d: dict[str, Any], where: str) -> Rope:
        rope = _one_rope({k: v for k, v in d.items() if k not in labels}, where, cfg, source, max_position_embeddings)
        for label in sorted(labels & set(d)):
            entry = d[label]
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source}: {where}.{label} is {entry!r}; qkiln needs a rope for every layer")
            per_layer = _one_rope(entry, f"{where}.{label}", cfg, source, max_position_embeddings)
            if per_layer != rope:
                raise CheckpointError(
                    f"{source}: {where}.{label} asks for {per_layer.describe()} but transformers' Llama ignores "
                    f"per-layer-type rope entries and runs {rope.describe()}; make them agree"
                )
        return rope

    if legacy:
        rope = read(legacy, "rope_scaling")
        if params and (other := read(params, "rope_parameters")) != rope:
            raise CheckpointError(
                f"{source}: rope_scaling ({rope.describe()}) and rope_parameters ({other.describe()}) disagree; keep one"
            )
        return rope
    return read(params or {}, "rope_parameters")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> LlamaConfig:
        """Parse a config.json; any malformed field is a CheckpointError naming the file."""
        try:
            return cls._from_dict(cfg, source)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
            raise CheckpointError(f"{source} has a malformed field ({what}); fix or re-download it") from None

    @classmethod
    def _from_dict(cls, cfg: dict[str, Any], source: str) -> LlamaConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        model_type = cfg.get("model_type")
        if arch not in LLAMA_ARCHITECTURES and not (arch is None and model_type in {"llama", "mistral"}):
            raise CheckpointError(
                f"{source}: architecture {arch or model_type!r} is not supported; "
                f"qkiln handles {', '.join(sorted(LLAMA_ARCHITECTURES))}"
            )
        arch = arch or ("MistralForCausalLM" if model_type == "mistral" else "LlamaForCausalLM")
        defaults = _ABSENT_DEFAULTS[arch]
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
        if missing:
            raise CheckpointError(f"{source}: missing or non-positive {', '.join(missing)}")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads  # transformers' rule: null/0 means derive
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise CheckpointError(f"{source}: head_dim {head_dim!r} must be a positive even integer (rotary pairs)")
        _refuse_unsupported_math(cfg, source)
        max_pos = int(cfg.get("max_position_embeddings", defaults["max_position_embeddings"]))  # null: malformed
        rope = parse_rope(cfg, source, max_position_embeddings=max_pos)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or defaults["num_key_value_heads"] or n_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", defaults["rms_norm_eps"])),
            rope_theta=rope.theta,
            rope_scaling=rope.scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            architecture=arch,
        )

    @classmethod
    def from_file(cls, path: Path) -> LlamaConfig:
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found; a Hugging Face checkpoint folder needs config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(cfg, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """A `config.json` that transformers' LlamaForCausalLM loads."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": "mistral" if self.architecture == "MistralForCausalLM" else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        # Both forms, saying the same: transformers 4.x (and tools that follow it) read `rope_theta` and
        # `rope_scaling`, transformers 5.x `rope_parameters` (a `rope_scaling` present takes its place there).
        rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
            rope_parameters = {**d["rope_scaling"], "rope_theta": self.rope_theta}
        d["rope_parameters"] = rope_parameters
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d
