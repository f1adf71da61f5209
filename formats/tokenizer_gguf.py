"""Rebuild a Hugging Face `tokenizers` tokenizer (tokenizer.json and friends) from a GGUF vocabulary.

The target is llama.cpp's own tokenization of the same GGUF, id for id, so a checkpoint imported from
GGUF and the GGUF itself see the same token stream.

- `tokenizer.ggml.model == "gpt2"` (byte-level BPE): vocabulary and merges as stored; llama.cpp splits
  text with a list of regexes chosen by `tokenizer.ggml.pre`, each regex splitting the pieces of the
  previous one and keeping the text between matches. That is a `Sequence` of `Split(..., "isolated")`
  pre-tokenizers followed by byte-level mapping without a prefix space. The regexes below are
  llama.cpp's (llama-vocab.cpp) for the pre-tokenizer names listed in `BPE_PRE_TOKENIZERS`.
- `tokenizer.ggml.model == "llama"` (SentencePiece BPE): llama.cpp merges the adjacent pair whose
  concatenation has the highest score, falls back to <0xXX> byte tokens, writes spaces as "▁" and adds
  one leading space to the text and after each special token. The same is a `tokenizers` BPE whose
  merge ranks follow the merged piece's score, with byte fallback and a Prepend("▁") normalizer (the
  normalizer runs per segment between added tokens, as llama.cpp does).
- Control tokens (token type 3) become special added tokens; user-defined ones (type 4) plain added
  tokens (llama.cpp parses those even when special parsing is off).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from qkiln.errors import GGUFError

# llama.cpp token types (llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, add_bos default), as llama.cpp defines them.
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "default": ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False),
    "llama-bpe": ((_LLAMA3,), True, True),
    "llama3": ((_LLAMA3,), True, True),
    "llama-v3": ((_LLAMA3,), True, True),
    "gpt-2": ((_GPT2,), False, False),
    # individual digits, then GPT-2 splitting (llama.cpp's STARCODER/REFACT/SMOLLM family)
    "smollm": ((r"\p{N}", _GPT2), False, False),
    "starcoder": ((r"\p{N}", _GPT2), False, False),
    "refact": ((r"\p{N}", _GPT2), False, False),
}


def _meta(meta: Mapping[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    value = meta.get(key, default)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise GGUFError(f"{where}: metadata '{key}' should be {kind.__name__}, got {type(value).__name__}")
    return value


def _special_id(meta: Mapping[str, Any], name: str, n_vocab: int, where: str) -> int | None:
    tid = _meta(meta, f"tokenizer.ggml.{name}_token_id", int, where)
    if tid is not None and not 0 <= tid < n_vocab:
        raise GGUFError(f"{where}: tokenizer.ggml.{name}_token_id {tid} is outside the vocabulary of {n_vocab}")
    return tid


def _vocab(meta: Mapping[str, Any], where: str) -> tuple[list[str], list[int]]:
    tokens = _meta(meta, "tokenizer.ggml.tokens", list, where)
    if not tokens:
        raise GGUFError(f"{where}: no tokenizer vocabulary (tokenizer.ggml.tokens); cannot rebuild a tokenizer")
    if not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{where}: tokenizer.ggml.tokens must be a list of strings")
    types = _meta(meta, "tokenizer.ggml.token_type", list, where) or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise GGUFError(f"{where}: tokenizer.ggml.token_type must hold one integer per token ({len(tokens)})")
    if len(set(tokens)) != len(tokens):
        raise GGUFError(f"{where}: the vocabulary has duplicate tokens; cannot rebuild a tokenizer")
    return tokens, [int(t) for t in types]


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    added = []
    for tok, kind in zip(tokens, types, strict=True):
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED):
            added.append(AddedToken(tok, special=kind == TOKEN_CONTROL, normalized=False, lstrip=False, rstrip=False,
                                    single_word=False))
    return added


def _bpe_tokenizer(meta: Mapping[str, Any], tokens: list[str], where: str) -> tuple[Tokenizer, bool]:
    pre = _meta(meta, "tokenizer.ggml.pre", str, where, "default")
    if pre not in BPE_PRE_TOKENIZERS:
        raise GGUFError(
            f"{where}: pre-tokenizer '{pre}' (tokenizer.ggml.pre) is not supported; qkiln rebuilds "
            f"{', '.join(sorted(BPE_PRE_TOKENIZERS))}"
        )
    regexes, ignore_merges, add_bos_default = BPE_PRE_TOKENIZERS[pre]
    merges_raw = _meta(meta, "tokenizer.ggml.merges", list, where) or []
    merges = []
    for m in merges_raw:
        parts = m.split(" ") if isinstance(m, str) else []
        if len(parts) != 2:
            raise GGUFError(f"{where}: merge {m!r:.40} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    vocab = {t: i for i, t in enumerate(tokens)}
    # tokenizers panics (a Rust panic, not an exception) on a merge outside the vocabulary: check first.
    bad = next((m for m in merges if m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab), None)
    if bad is not None:
        raise GGUFError(f"{where}: merge {' '.join(bad)!r:.60} uses or makes a token that is not in the vocabulary")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False,
                               byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False) for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, add_bos_default


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Every split of a vocabulary piece into two pieces, best merged score first (llama.cpp's order).

    llama.cpp looks any concatenation up in the whole vocabulary; ties in score go to the piece with
    the smaller id, which for SentencePiece vocabularies (scores decrease with id) is the same order.
    """
    index = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[float, int, int, str, str]] = []
    for merged, mid in index.items():
        if types[mid] == TOKEN_BYTE:
            continue
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in index and right in index:
                merges.append((-scores[mid], mid, index[left], left, right))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _spm_tokenizer(meta: Mapping[str, Any], tokens: list[str], types: list[int], where: str) -> tuple[Tokenizer, bool]:
    scores = _meta(meta, "tokenizer.ggml.scores", list, where)
    if scores is None or len(scores) != len(tokens) or not all(isinstance(x, float | int) for x in scores):
        raise GGUFError(f"{where}: a SentencePiece vocabulary needs one score per token (tokenizer.ggml.scores)")
    byte_tokens = {f"<0x{b:02X}>" for b in range(256)}
    if not byte_tokens <= set(tokens):
        raise GGUFError(
            f"{where}: SentencePiece vocabulary without the 256 <0xXX> byte tokens is not supported "
            "(llama.cpp's byte fallback cannot be reproduced exactly)"
        )
    if _meta(meta, "tokenizer.ggml.remove_extra_whitespaces", bool, where, False):
        raise GGUFError(f"{where}: tokenizer.ggml.remove_extra_whitespaces is not supported")
    if meta.get("tokenizer.ggml.precompiled_charsmap"):
        raise GGUFError(f"{where}: SentencePiece vocabularies with a precompiled charsmap are not supported")
    unk_id = _special_id(meta, "unknown", len(tokens), where)
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=_spm_merges(tokens, scores, types), byte_fallback=True,
                               fuse_unk=True, unk_token=tokens[unk_id] if unk_id is not None else None))
    steps: list[normalizers.Normalizer] = []
    if _meta(meta, "tokenizer.ggml.add_space_prefix", bool, where, True):
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok, True


def build_tokenizer(meta: Mapping[str, Any], *, where: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` that tokenizes as llama.cpp does for this GGUF's vocabulary."""
    return _build(meta, where)[0]


def _build(meta: Mapping[str, Any], where: str) -> tuple[Tokenizer, dict[str, Any]]:
    model = _meta(meta, "tokenizer.ggml.model", str, where)
    if model is None:
        raise GGUFError(f"{where}: no tokenizer in the file (tokenizer.ggml.model missing)")
    tokens, types = _vocab(meta, where)
    if model == "gpt2":
        tok, add_bos_default = _bpe_tokenizer(meta, tokens, where)
    elif model == "llama":
        tok, add_bos_default = _spm_tokenizer(meta, tokens, types, where)
    else:
        raise GGUFError(f"{where}: tokenizer model '{model}' is not supported (only 'gpt2' BPE and 'llama' SentencePiece)")
    added = _added_tokens(tokens, types)
    if added:
        tok.add_special_tokens(added)
    n = len(tokens)
    ids = {name: _special_id(meta, name, n, where) for name in ("bos", "eos", "unknown", "padding")}
    add_bos = _meta(meta, "tokenizer.ggml.add_bos_token", bool, where, add_bos_default)
    add_eos = _meta(meta, "tokenizer.ggml.add_eos_token", bool, where, False)
    for flag, name in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[name] is None:
            raise GGUFError(f"{where}: tokenizer.ggml.add_{name}_token is set but there is no {name} token id")
    if add_bos or add_eos:
        bos = tokens[ids["bos"]] if add_bos else None  # type: ignore[index]
        eos = tokens[ids["eos"]] if add_eos else None  # type: ignore[index]

        def seq(piece: str, type_id: int) -> list[str]:
            return [*([f"{bos}:{type_id}"] if bos else []), f"{piece}:{type_id}", *([f"{eos}:{type_id}"] if eos else [])]

        special = [(t, tokens.index(t)) for t in (bos, eos) if t]
        tok.post_processor = processors.TemplateProcessing(
            single=seq("$A", 0), pair=seq("$A", 0) + seq("$B", 1), special_tokens=special
        )
    info = {"tokens": tokens, "types": types, "ids": ids, "add_bos": add_bos, "add_eos": add_eos}
    return tok, info


def tokenizer_files(meta: Mapping[str, Any], *, where: str, model_max_length: int | None = None) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json as text."""
    tok, info = _build(meta, where)
    tokens, types, ids = info["tokens"], info["types"], info["ids"]

    def name_of(key: str) -> str | None:
        return tokens[ids[key]] if ids[key] is not None else None

    special_map = {k: v for k, v in (("bos_token", name_of("bos")), ("eos_token", name_of("eos")),
                                      ("unk_token", name_of("unknown")), ("pad_token", name_of("padding")))
                   if v is not None}
    added_decoder = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": k == TOKEN_CONTROL}
        for i, (t, k) in enumerate(zip(tokens, types, strict=True)) if k in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": info["add_bos"],
        "add_eos_token": info["add_eos"],
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added_decoder,
        **special_map,
    }
    if model_max_length:
        config["model_max_length"] = model_max_length
    template = _meta(meta, "tokenizer.chat_template", str, where)
    if template:
        config["chat_template"] = template
    generation = {"_from_model_config": True,
                  **{f"{k}_token_id": ids[g] for k, g in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
                     if ids[g] is not None}}

    def dump(doc: Any) -> str:
        return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    return {
        "tokenizer.json": tok.to_str(pretty=True) + "\n",
        "tokenizer_config.json": dump(config),
        "special_tokens_map.json": dump(special_map),
        "generation_config.json": dump(generation),
    }
