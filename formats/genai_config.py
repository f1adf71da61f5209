"""`genai_config.json` and the tokenizer files that let `onnxruntime_genai.Model(folder)` generate.

The keys are those onnxruntime-genai 0.18's model builder writes for a Llama decoder (`make_genai_config`
in `onnxruntime_genai/models/builders/base.py`); special token ids are resolved the same way: config.json
(generation_config.json overriding), the tokenizer's own `eos_token` added to the EOS list when the config
leaves it out (a chat model ends its turns with it), pad = the first EOS when absent.

`search.max_length` is where onnxruntime-genai sizes its KV cache (it preallocates max_length positions
when past and present share a buffer), so it defaults to a modest 2048, not the model's whole context.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from qkiln.model.config import LlamaConfig

DEFAULT_MAX_LENGTH = 2048
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _token_id(tokenizer_dir: Path, token: Any) -> int | None:
    """The id of a special token named in tokenizer_config.json (a string or {"content": ...})."""
    content = token.get("content") if isinstance(token, dict) else token
    path = tokenizer_dir / "tokenizer.json"
    if not isinstance(content, str) or not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    for added in doc.get("added_tokens", []):
        if added.get("content") == content:
            return int(added["id"])
    vocab = (doc.get("model") or {}).get("vocab")
    return int(vocab[content]) if isinstance(vocab, dict) and content in vocab else None


def special_ids(config: LlamaConfig, tokenizer_dir: Path) -> tuple[int, int | list[int], int]:
    """(bos, eos, pad) as onnxruntime-genai's builder resolves them."""
    bos: Any = config.bos_token_id
    eos: Any = config.eos_token_id
    pad: Any = config.pad_token_id
    gen = tokenizer_dir / "generation_config.json"
    if gen.is_file():
        g = json.loads(gen.read_text(encoding="utf-8"))
        bos = g.get("bos_token_id", bos) if g.get("bos_token_id") is not None else bos
        eos = g.get("eos_token_id") if g.get("eos_token_id") is not None else eos
        pad = g.get("pad_token_id") if g.get("pad_token_id") is not None else pad
    tok_cfg = tokenizer_dir / "tokenizer_config.json"
    turn_end = None
    if tok_cfg.is_file():
        turn_end = _token_id(tokenizer_dir, json.loads(tok_cfg.read_text(encoding="utf-8")).get("eos_token"))
    if eos is None:
        eos = turn_end if turn_end is not None else 2
    ids = list(eos) if isinstance(eos, list) else [int(eos)]
    if turn_end is not None and turn_end not in ids:
        eos = [turn_end, *ids]
    return (1 if bos is None else int(bos)), eos, (ids[0] if pad is None else int(pad))


def genai_config(config: LlamaConfig, tokenizer_dir: Path, *, context_length: int, filename: str = "model.onnx",
                 max_length: int | None = None) -> dict[str, Any]:
    bos, eos, pad = special_ids(config, tokenizer_dir)
    n = config.num_hidden_layers
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": config.head_dim,
                "hidden_size": config.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": config.num_attention_heads,
                "num_hidden_layers": n,
                "num_key_value_heads": config.num_key_value_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "llama",
            "vocab_size": config.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": min(context_length, max_length or DEFAULT_MAX_LENGTH),
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": True,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def copy_tokenizer(src: Path, dest: Path, *, context_length: int) -> list[str]:
    """Copy the tokenizer files onnxruntime-genai reads; tokenizer_config's `model_max_length` becomes the
    context length when it is missing or not a sane integer (transformers writes 1e30 for "no limit")."""
    copied = []
    for fname in (*TOKENIZER_FILES, "generation_config.json"):
        if not (src / fname).is_file():
            continue
        if fname == "tokenizer_config.json":
            doc = json.loads((src / fname).read_text(encoding="utf-8"))
            mml = doc.get("model_max_length")
            if not isinstance(mml, int) or mml > context_length:
                doc["model_max_length"] = context_length
            (dest / fname).write_text(json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src / fname, dest / fname)
        copied.append(fname)
    return copied
