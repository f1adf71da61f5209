"""A Hugging Face `tokenizer.json` expressed as llama.cpp's GGUF tokenizer keys.

llama.cpp does not run the HF pre-tokenizer graph; it runs one of its own named pre-tokenizers
(`tokenizer.ggml.pre`). So the name must be chosen from what the HF graph *does*, not guessed from
the model name: we recognise the graph's structure (digits split, byte-level regex, Llama-3 split
regex) and map it to the llama.cpp pre-tokenizer with the same behaviour. A graph we cannot map is
refused — a GGUF that tokenizes differently from its source would silently degrade the model.

Byte-level BPE vocabularies (GPT-2 style: SmolLM, Llama 3) become `tokenizer.ggml.model = gpt2`
with tokens, token types and merges. SentencePiece-style BPE (byte fallback, `▁` for spaces:
Llama 2, TinyLlama, Mistral) becomes `llama` with tokens, scores and types; the scores come from
`tokenizer.model` when the checkpoint ships one, else from the merges (formats/tokenizer_spm.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gguf import TokenType

from qkiln.errors import GGUFError
from qkiln.formats.sentencepiece_model import SentencePieceModel, read_model
from qkiln.formats.tokenizer_gguf import BPE_PRE_TOKENIZERS
from qkiln.formats.tokenizer_spm import (
    SCORES_FROM_MERGES,
    SCORES_FROM_MODEL,
    check_scores_reproduce_merges,
    merge_pairs,
    scores_from_merges,
)

# The split regex of Llama 3's tokenizer.json (llama.cpp's "llama-bpe" pre-tokenizer).
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)


@dataclasses.dataclass(frozen=True)
class GGUFTokenizer:
    """Everything `tokenizer.*` in a GGUF holds; lists are indexed by token id (len == vocab size)."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str | None  # llama.cpp pre-tokenizer name, e.g. "smollm", "llama-bpe", "gpt-2"
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    scores: list[float] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    add_space_prefix: bool = False
    scores_source: str | None = None  # SCORES_FROM_MODEL or SCORES_FROM_MERGES for `llama` vocabularies

    def items(self) -> list[tuple[str, Any]]:
        """(key, value) pairs in the order they are written; None values are left out."""
        kv: list[tuple[str, Any]] = [
            ("tokenizer.ggml.model", self.model),
            ("tokenizer.ggml.pre", self.pre),
            ("tokenizer.ggml.tokens", self.tokens),
            ("tokenizer.ggml.scores", self.scores),
            ("tokenizer.ggml.token_type", self.token_types),
            ("tokenizer.ggml.merges", self.merges or None),
            ("tokenizer.ggml.bos_token_id", self.bos_id),
            ("tokenizer.ggml.eos_token_id", self.eos_id),
            ("tokenizer.ggml.unknown_token_id", self.unk_id),
            ("tokenizer.ggml.padding_token_id", self.pad_id),
            ("tokenizer.ggml.add_bos_token", self.add_bos),
            ("tokenizer.ggml.add_eos_token", self.add_eos),
            ("tokenizer.ggml.add_space_prefix", self.add_space_prefix),
            ("tokenizer.chat_template", self.chat_template),
        ]
        return [(k, v) for k, v in kv if v is not None]


def _load_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path}: cannot read tokenizer file ({e}); the checkpoint needs a valid tokenizer.json") from None
    if not isinstance(doc, dict):
        raise GGUFError(f"{path}: expected a JSON object")
    return doc


def _flatten(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A pre-tokenizer/normalizer graph as a flat list of steps (Sequence nodes expanded)."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        children: list[dict[str, Any]] = next((node[k] for k in ("pretokenizers", "normalizers", "processors", "decoders") if k in node), [])
        return [step for child in children for step in _flatten(child)]
    return [node]


def _split_regex(step: dict[str, Any]) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") or pattern.get("String")


def _llama_cpp_regex_chain(steps: list[dict[str, Any]]) -> str | None:
    """The name whose regex chain this is, for graphs written from llama.cpp's own regexes.

    qkiln's GGUF importer (formats/tokenizer_gguf.py) expresses each llama.cpp pre-tokenizer as
    Split(regex, isolated)... + ByteLevel(no regex); this maps such a graph back to the name.
    """
    if len(steps) < 2 or steps[-1].get("type") != "ByteLevel" or steps[-1].get("use_regex", True):
        return None
    splits = steps[:-1]
    if any(s.get("type") != "Split" or s.get("behavior") != "Isolated" or s.get("invert") for s in splits):
        return None
    chain = tuple(_split_regex(s) for s in splits)
    for name in ("smollm", "llama-bpe", "gpt-2", "default", *BPE_PRE_TOKENIZERS):
        if name in BPE_PRE_TOKENIZERS and BPE_PRE_TOKENIZERS[name][0] == chain:
            return name
    return None


def pre_tokenizer_name(tok: dict[str, Any], source: str = "tokenizer.json") -> str:
    """llama.cpp's pre-tokenizer whose behaviour equals this byte-level graph, or GGUFError.

    - Digits(individual) + ByteLevel(regex, no prefix space)  -> "smollm" (SmolLM/StarCoder vocabularies)
    - ByteLevel(regex, no prefix space)                       -> "gpt-2"
    - Split(Llama-3 regex, Isolated) + ByteLevel(no regex)    -> "llama-bpe"
    """
    if tok.get("normalizer"):
        raise GGUFError(
            f"{source}: a byte-level vocabulary with a normalizer ({tok['normalizer'].get('type')}) cannot be "
            "expressed as a llama.cpp tokenizer"
        )
    steps = _flatten(tok.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space"):
        raise GGUFError(f"{source}: ByteLevel with add_prefix_space is not a llama.cpp pre-tokenizer")
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Split", "ByteLevel"]
        and _split_regex(steps[0]) == _LLAMA3_SPLIT
        and steps[0].get("behavior") == "Isolated"
        and not steps[1].get("use_regex", True)
    ):
        return "llama-bpe"
    name = _llama_cpp_regex_chain(steps)
    if name is not None:
        return name
    raise GGUFError(
        f"{source}: pre-tokenizer {'+'.join(str(k) for k in kinds) or 'none'} has no llama.cpp equivalent "
        "(supported: SmolLM digits+byte-level, GPT-2 byte-level, Llama-3 split); the vocabulary cannot be "
        "expressed in GGUF"
    )


def _is_sentencepiece_bpe(model: dict[str, Any], tok: dict[str, Any]) -> bool:
    norm = [n.get("type") for n in _flatten(tok.get("normalizer"))]
    pre = [p.get("type") for p in _flatten(tok.get("pre_tokenizer"))]
    return bool(model.get("byte_fallback")) and (
        "Replace" in norm or "Metaspace" in pre
    )


def _merges(model: dict[str, Any]) -> list[str]:
    """Merges as 'left right' strings (tokenizers writes either strings or [left, right] pairs)."""
    out = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            out.append(m)
        else:
            left, right = m
            if " " in left or " " in right:
                raise GGUFError("tokenizer.json: a merge contains a space, which GGUF's 'a b' merges cannot express")
            out.append(f"{left} {right}")
    return out


def _token_id(tokens: list[str], value: Any) -> int | None:
    """Id of a special token given as a string, an AddedToken dict, or an id."""
    if value is None:
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, list):
        return _token_id(tokens, value[0]) if value else None
    if isinstance(value, dict):
        value = value.get("content")
    try:
        return tokens.index(value)
    except ValueError:
        return None


def _chat_template(folder: Path, tok_cfg: dict[str, Any]) -> str | None:
    tmpl = tok_cfg.get("chat_template")
    if isinstance(tmpl, list):  # named templates: llama.cpp uses "default"
        named = {t.get("name"): t.get("template") for t in tmpl if isinstance(t, dict)}
        tmpl = named.get("default") or next(iter(named.values()), None)
    if tmpl is None and (folder / "chat_template.jinja").is_file():
        tmpl = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return tmpl or None


def _template_specials(tok: dict[str, Any], tok_cfg: dict[str, Any], tokens: list[str]) -> tuple[bool, int | None, bool, int | None]:
    """(add_bos, bos id, add_eos, eos id) as HF's encode() adds them: a leading (trailing) special token of
    the TemplateProcessing, else tokenizer_config's add_bos_token (add_eos_token) — llama.cpp's converter's
    order. The ids are None unless the template names the token."""
    lead = tail = None
    for step in _flatten(tok.get("post_processor")):
        if step.get("type") == "TemplateProcessing":
            single = step.get("single") or []
            lead = single[0]["SpecialToken"]["id"] if single and "SpecialToken" in single[0] else None
            tail = single[-1]["SpecialToken"]["id"] if len(single) > 1 and "SpecialToken" in single[-1] else None
    return (
        lead is not None or bool(tok_cfg.get("add_bos_token", False)), _token_id(tokens, lead),
        tail is not None or bool(tok_cfg.get("add_eos_token", False)), _token_id(tokens, tail),
    )


_PREPEND = {"type": "Prepend", "prepend": "▁"}
_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}


def _spm_space_prefix(tok: dict[str, Any], tok_cfg: dict[str, Any], spm: SentencePieceModel | None, source: str) -> bool:
    """llama.cpp's add_space_prefix for this SentencePiece-style tokenizer, or GGUFError.

    llama.cpp escapes spaces as "▁" and, with add_space_prefix, puts one "▁" before the text and after every
    special token: HF's Prepend("▁") + Replace(" ", "▁") normalizer does the same (it runs per segment between
    added tokens), and so does SentencePiece with add_dummy_prefix. Metaspace does not (it skips the prefix
    when the text starts with a space, and its "first" scheme skips it after special tokens).
    tokenizer_config's `add_prefix_space`, when set, wins, as in transformers and llama.cpp's converter.
    """
    if spm is not None:
        prefix = spm.add_dummy_prefix
    else:
        norm = _flatten(tok.get("normalizer"))
        pre = _flatten(tok.get("pre_tokenizer"))
        if pre:
            raise GGUFError(
                f"{source}: pre-tokenizer {'+'.join(str(p.get('type')) for p in pre)} places the \"▁\" prefix "
                "differently from llama.cpp (which adds it to the text and after every special token); the "
                "vocabulary cannot be expressed exactly without tokenizer.model"
            )
        if norm == [_PREPEND, _REPLACE]:
            prefix = True
        elif norm == [_REPLACE]:
            prefix = False
        else:
            raise GGUFError(
                f"{source}: normalizer {'+'.join(str(n.get('type')) for n in norm) or 'none'} has no llama.cpp "
                "equivalent (supported: Prepend('▁') + Replace(' ', '▁')); the vocabulary cannot be expressed"
            )
    cfg = tok_cfg.get("add_prefix_space")
    return cfg if isinstance(cfg, bool) else prefix


def _spm_model(folder: Path, source: str) -> SentencePieceModel | None:
    """tokenizer.model when the checkpoint ships one, checked for what llama.cpp's encoder can reproduce."""
    path = folder / "tokenizer.model"
    if not path.is_file():
        return None
    spm = read_model(path)
    why = (
        f"model type {spm.model_type} (llama.cpp's SentencePiece encoder is BPE)" if spm.model_type != "bpe"
        else "no byte fallback" if not spm.byte_fallback
        else f"normalization rule {spm.normalizer_name!r}" if spm.precompiled_charsmap
        else "remove_extra_whitespaces" if spm.remove_extra_whitespaces
        else "escape_whitespaces off" if not spm.escape_whitespaces
        else None
    )
    if why:
        raise GGUFError(f"{path}: {why} cannot be expressed as a llama.cpp vocabulary")
    return spm


def _check_added_spm(added: dict[str, dict[str, Any]], source: str) -> None:
    """llama.cpp matches added tokens in the raw text, as they are: refuse options that make HF match otherwise."""
    for content, a in added.items():
        flags = [k for k in ("normalized", "lstrip", "rstrip", "single_word") if a.get(k)]
        if flags:
            raise GGUFError(
                f"{source}: added token {content!r} has {', '.join(flags)}, which llama.cpp's SentencePiece "
                "tokenizer does not reproduce; the vocabulary cannot be expressed exactly"
            )


def tokenizer_from_folder(folder: Path, vocab_size: int, config: dict[str, Any] | None = None) -> GGUFTokenizer:
    """Read `folder/tokenizer.json` (+ tokenizer_config.json, tokenizer.model) and express it for llama.cpp.

    `vocab_size` is the model's embedding row count: ids the tokenizer does not define are
    padded with unused `[PAD<id>]` tokens, as llama.cpp's converter does.
    """
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{folder}: no tokenizer.json; GGUF needs the tokenizer (save it with tokenizer.save_pretrained)")
    tok = _load_json(path)
    tok_cfg = _load_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    config = config or {}
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFError(
            f"{path}: tokenizer model {model.get('type')!r} cannot be expressed in GGUF by qkiln (only BPE vocabularies)"
        )
    sentencepiece = _is_sentencepiece_bpe(model, tok)
    pre = None if sentencepiece else pre_tokenizer_name(tok, str(path))
    spm = _spm_model(folder, str(folder / "tokenizer.model")) if sentencepiece else None
    add_space_prefix = _spm_space_prefix(tok, tok_cfg, spm, str(path)) if sentencepiece else False

    vocab: dict[str, int] = dict(model.get("vocab") or {})
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    if sentencepiece:
        _check_added_spm(added, str(path))
    for content, a in added.items():
        vocab[content] = a["id"]
    if not vocab:
        raise GGUFError(f"{path}: empty vocabulary")
    max_id = max(vocab.values())
    if max_id >= vocab_size:
        raise GGUFError(
            f"{path}: token id {max_id} does not fit the model's {vocab_size} embedding rows; "
            "the vocabulary cannot be expressed"
        )
    tokens: list[str | None] = [None] * vocab_size
    for text, i in vocab.items():
        if tokens[i] is not None and tokens[i] != text:
            raise GGUFError(f"{path}: id {i} is used by both {tokens[i]!r} and {text!r}")
        tokens[i] = text
    types = [int(TokenType.NORMAL)] * vocab_size
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(TokenType.UNUSED)
        elif t in added:
            types[i] = int(TokenType.CONTROL if added[t].get("special") else TokenType.USER_DEFINED)
        elif sentencepiece and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types[i] = int(TokenType.BYTE)
    names: list[str] = [t for t in tokens if t is not None]
    if len(set(names)) != len(names):
        raise GGUFError(f"{path}: duplicate token strings; the vocabulary cannot be expressed in GGUF")

    unk_id = _token_id(names, model.get("unk_token"))
    if unk_id is not None and sentencepiece:
        types[unk_id] = int(TokenType.UNKNOWN)
    add_bos, template_bos, add_eos, template_eos = _template_specials(tok, tok_cfg, names)
    bos = config.get("bos_token_id")
    bos_id = _token_id(names, bos) if bos is not None else _token_id(names, tok_cfg.get("bos_token"))
    if template_bos is not None:
        bos_id = template_bos
    eos = config.get("eos_token_id")
    eos_id = _token_id(names, eos) if eos is not None else _token_id(names, tok_cfg.get("eos_token"))
    if template_eos is not None:
        eos_id = template_eos
    pad = config.get("pad_token_id")
    pad_id = _token_id(names, pad) if pad is not None else _token_id(names, tok_cfg.get("pad_token"))
    scores = None
    scores_source = None
    if sentencepiece:
        if spm is not None:
            scores = _scores_from_model(spm, names, types, str(folder / "tokenizer.model"))
            scores_source = SCORES_FROM_MODEL
        else:
            merges = merge_pairs(model.get("merges") or [], str(path))
            scores = scores_from_merges(names, types, merges, str(path))
            check_scores_reproduce_merges(names, types, scores, merges, model.get("unk_token"), str(path))
            scores_source = SCORES_FROM_MERGES
        if not all(f"<0x{b:02X}>" in vocab for b in range(256)):
            raise GGUFError(f"{path}: a byte-fallback vocabulary without all 256 <0xXX> tokens cannot be expressed")
    return GGUFTokenizer(
        model="llama" if sentencepiece else "gpt2",
        pre=pre if not sentencepiece else "default",
        tokens=names,
        token_types=types,
        merges=[] if sentencepiece else _merges(model),
        scores=scores,
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=unk_id,
        pad_id=pad_id,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=_chat_template(folder, tok_cfg),
        add_space_prefix=add_space_prefix,
        scores_source=scores_source,
    )


def _scores_from_model(spm: SentencePieceModel, tokens: list[str], types: list[int], source: str) -> list[float]:
    """tokenizer.model's scores (and piece types, into `types`) for the ids it defines; added tokens above
    them score -1000 and padding rows 0, as llama.cpp's converter writes. The pieces must be tokenizer.json's."""
    if len(spm.pieces) > len(tokens):
        raise GGUFError(f"{source}: {len(spm.pieces)} pieces do not fit the model's {len(tokens)} embedding rows")
    scores = [0.0] * len(tokens)
    for i, (piece, score, kind) in enumerate(zip(spm.pieces, spm.scores, spm.types, strict=True)):
        if piece != tokens[i]:
            raise GGUFError(
                f"{source}: piece {i} is {piece!r} but tokenizer.json has {tokens[i]!r}; the two tokenizers disagree"
            )
        scores[i] = score
        if types[i] not in (TokenType.CONTROL, TokenType.USER_DEFINED):  # tokenizer.json's added tokens win
            types[i] = kind
    for i in range(len(spm.pieces), len(tokens)):
        if types[i] != TokenType.UNUSED:
            scores[i] = -1000.0
    return scores
