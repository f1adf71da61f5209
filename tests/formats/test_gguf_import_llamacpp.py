"""The rebuilt tokenizer gives llama.cpp's own token ids for the same GGUF (via llama-cpp-python)."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import gguf
import pytest

from qkiln.errors import UserError
from qkiln.formats.gguf_read import read_gguf
from qkiln.formats.tokenizer_gguf import build_tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh test builds it)")

pytestmark = pytest.mark.llamacpp

TEXTS = [
    "naïve café 東京 🙂",
    "12345 3.14159",
    "a  b\t\tc\n\n\nd",
    "def f(x):\n    return {'k': x**2}  # square\n",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n<|im_start|>assistant\n",
    "",
    " ",
    "   leading and trailing   ",
    "I'm sure they'll say WE'RE done, isn't it?",
    "Ünïcödé ½ ² ٣ १२ ⅷ",
    "x\u00a0y\u2003z\u3000w",
    "🙂🙂🙂 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "line\r\nbreak\r\n\r\n",
    "$100,000.00 + 5% = ~|^<>",
    "ελληνικά русский العربية עברית",
]


def _fuzz(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [*"abc XYZ 0192 .,;'!?$+<=>^~|`\t\n\r", "é", "東", "🙂", "\u00a0", "½", "٣", "'s", "'LL", "<|im_end|>", "1234"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24))) for _ in range(n)]


def _llama_ids(model: Path, texts: list[str], add_bos: bool = False) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(model), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=add_bos, special=True) for t in texts]
    finally:
        llm.close()


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from qkiln.demo import demo_gguf_path

    try:
        return demo_gguf_path()
    except UserError as e:
        pytest.skip(f"demo GGUF not installed: {e}")


def _same_ids(model: Path, texts: list[str], add_special: bool = False) -> None:
    tok = build_tokenizer(read_gguf(model).metadata, where=str(model))
    want = _llama_ids(model, texts, add_bos=add_special)
    for text, ids in zip(texts, want, strict=True):
        assert tok.encode(text, add_special_tokens=add_special).ids == ids, repr(text)


def test_demo_tokenizer_matches_llama_cpp(demo_gguf):
    _same_ids(demo_gguf, TEXTS + _fuzz(400, 0))


def _vocab_only_gguf(path: Path, meta_from: Path, pre: str) -> Path:
    """A tensor-less llama GGUF carrying the demo vocabulary with another `tokenizer.ggml.pre`."""
    meta = read_gguf(meta_from).metadata
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("pre", ["gpt-2", "default", "llama-bpe", "smollm"])
def test_bpe_pre_tokenizers_match_llama_cpp(pre, demo_gguf, tmp_path):
    model = _vocab_only_gguf(tmp_path / f"{pre}.gguf", demo_gguf, pre)
    _same_ids(model, TEXTS + _fuzz(300, 1))
    _same_ids(model, TEXTS[:6], add_special=True)  # llama-bpe adds <bos> by default, the others do not


def _toy_sentencepiece_gguf(path: Path) -> Path:
    """A SentencePiece-style vocabulary learned by BPE on a license text: byte tokens, scores = -merge rank."""
    text = Path("/usr/share/common-licenses/Apache-2.0").read_text()[:15000]
    words = collections.Counter("▁" + w for w in text.replace("\n", " ").split(" ") if w)
    seqs = {w: list(w) for w in words}
    pieces: list[str] = []
    for _ in range(250):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, c in words.items():
            for a, b in zip(seqs[w], seqs[w][1:], strict=False):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        pieces.append(a + b)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types, scores = [2, 3, 3, *[6] * 256], [0.0] * 259
    for i, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i))
    for c in sorted({c for w in words for c in w} - set(tokens)):
        tokens.append(c)
        types.append(1)
        scores.append(-1000.0 - len(tokens))
    tokens.append("<|user|>")
    types.append(4)
    scores.append(0.0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_scores(scores)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_sentencepiece_vocab_matches_llama_cpp(tmp_path):
    model = _toy_sentencepiece_gguf(tmp_path / "spm.gguf")
    lines = [ln for ln in Path("/usr/share/common-licenses/MPL-2.0").read_text().splitlines() if ln.strip()]
    rng = random.Random(2)
    samples = [rng.choice(lines)[rng.randint(0, 8):][: rng.randint(1, 70)] for _ in range(300)]
    texts = [*TEXTS, "<s>hi</s> there", "x<|user|>y z", "Hello world", *samples]
    _same_ids(model, texts)
    _same_ids(model, texts[:20], add_special=True)  # <s> first, as llama.cpp adds it for SentencePiece
