"""The Llama architecture's hyper-parameters, parsed from a Hugging Face `config.json`.

One frozen dataclass shared by the checkpoint reader, the GGUF importer/writer and the NumPy runtime.
"""

from __future__ import annotations

import dataclasses
import json
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
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
        if missing:
            raise CheckpointError(f"{source}: missing or non-positive {', '.join(missing)}")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        rope_scaling = None
        rs = cfg.get("rope_scaling")
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                rope_scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise CheckpointError(f"{source}: attention_bias/mlp_bias are not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            architecture=arch or "LlamaForCausalLM",
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
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d
