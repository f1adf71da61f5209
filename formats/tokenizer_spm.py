"""Scores for a SentencePiece-style (`llama`) GGUF vocabulary that make llama.cpp tokenize as the model does.

llama.cpp's SentencePiece tokenizer (llama-vocab.cpp, `llm_tokenizer_spm_session`) does not read merges: it
starts from UTF-8 characters and repeatedly merges the adjacent pair whose concatenation is a vocabulary
token with the highest *score*, the leftmost on ties, then falls back to <0xXX> byte tokens for characters
that are not tokens. That is SentencePiece's own BPE encoder, so the scores decide everything:

- A checkpoint that ships `tokenizer.model` has the real scores: llama.cpp with them *is* the tokenizer the
  model was trained with (llama.cpp's own converter copies them the same way).
- Otherwise only `tokenizer.json` is there, whose BPE applies the pair of lowest *rank* in `merges`. Giving
  each piece the score minus the rank of the first merge that creates it reproduces that order, provided
  (checked here, else the vocabulary is refused) every merge is a pair of pieces making a piece, every split
  of a piece into two pieces is a listed merge (llama.cpp merges any such pair), and the resulting encoder
  gives the same ids as `tokenizers` on every piece and on runs of spaces — where the ranks of different
  pieces interleave, as in Llama 2's whitespace pieces. Scores of `-id` are wrong: Llama 2's ids are not in
  merge order ("▁▁" is id 259, created by its last merge), so runs of spaces came out differently.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from gguf import TokenType

from qkiln.errors import GGUFError

SCORES_FROM_MODEL = "tokenizer.model"
SCORES_FROM_MERGES = "tokenizer.json merges"


def merge_pairs(raw: Iterable[object], where: str) -> list[tuple[str, str]]:
    """`model.merges` as (left, right) pairs (tokenizers writes "a b" strings or [a, b] lists)."""
    pairs = []
    for m in raw:
        parts = m.split(" ") if isinstance(m, str) else list(m) if isinstance(m, list) else []
        if len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
            raise GGUFError(f"{where}: merge {m!r:.40} is not a pair of tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def scores_from_merges(tokens: Sequence[str], types: Sequence[int], merges: Sequence[tuple[str, str]],
                       where: str) -> list[float]:
    """Per-token scores equivalent to `merges` for llama.cpp, or GGUFError naming why none exist.

    A piece's score is minus the rank of the first merge that creates it; pieces no merge creates (single
    characters) score below every merge; byte, control, user-defined and unused tokens score 0, as in
    SentencePiece models (llama.cpp never builds them from text it has split off as special).
    """
    index = {t: i for i, t in enumerate(tokens)}
    first: dict[str, int] = {}
    listed = set(merges)
    for rank, (left, right) in enumerate(merges):
        merged = left + right
        if left not in index or right not in index or merged not in index:
            raise GGUFError(f"{where}: merge {left!r} + {right!r} uses or makes a token that is not in the vocabulary")
        first.setdefault(merged, rank)
    bottom = -float(len(merges))
    scores = [0.0] * len(tokens)
    for i, (t, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind != TokenType.NORMAL:
            continue
        scores[i] = float(-first[t]) if t in first else bottom
    # llama.cpp merges any two adjacent symbols that concatenate to a token: an unlisted split would merge
    # where tokenizers does not.
    for t, i in index.items():
        if types[i] not in (TokenType.NORMAL, TokenType.BYTE):
            continue
        for cut in range(1, len(t)):
            pair = (t[:cut], t[cut:])
            if pair[0] in index and pair[1] in index and pair not in listed:
                raise GGUFError(
                    f"{where}: {pair[0]!r} + {pair[1]!r} makes the token {t!r} but is not a merge; llama.cpp would "
                    "merge it, so its tokenization cannot equal this tokenizer's (ship tokenizer.model, or list "
                    "every split of a piece in merges)"
                )
    return scores


def spm_encode(escaped: str, index: dict[str, int], scores: Sequence[float], byte_ids: Sequence[int]) -> list[int]:
    """llama.cpp's SentencePiece encoding of text already escaped ("▁" for spaces, prefix added).

    Hot for the exactness check (~1 s over a 32k vocabulary): plain lists and a heap, as llama.cpp does it.
    """
    syms = list(escaped)
    n = len(syms)
    prev = list(range(-1, n - 1))
    nxt = [*range(1, n), -1] if n else []
    heap: list[tuple[float, int, int, int]] = []

    def push(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        text = syms[left] + syms[right]
        tid = index.get(text)
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], left, right, len(text)))

    for i in range(1, n):
        push(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left] += syms[right]
        syms[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        push(prev[left], left)
        push(left, nxt[left])
    out: list[int] = []
    i = 0 if n else -1
    while i != -1:
        tid = index.get(syms[i])
        if tid is not None:
            out.append(tid)
        else:
            out.extend(byte_ids[b] for b in syms[i].encode("utf-8"))
        i = nxt[i]
    return out


def check_scores_reproduce_merges(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float],
                                  merges: Sequence[tuple[str, str]], unk: str | None, where: str) -> None:
    """GGUFError unless llama.cpp with `scores` encodes like `tokenizers` with `merges` on every piece and on
    runs of spaces (alone and before a word): the places where a rank order and a score order can part."""
    from tokenizers import Tokenizer, models

    index = {t: i for i, t in enumerate(tokens)}
    byte_ids = [index[f"<0x{b:02X}>"] for b in range(256)]
    bpe = Tokenizer(models.BPE(vocab=dict(index), merges=list(merges), byte_fallback=True, fuse_unk=True,
                               unk_token=unk))
    probes = [t for t, k in zip(tokens, types, strict=True) if k in (TokenType.NORMAL, TokenType.BYTE)]
    longest = max((len(t) for t in probes if set(t) == {"▁"}), default=1)
    for n in range(1, 2 * longest + 3):
        probes += ["▁" * n, "▁" * n + "▁x", "x" + "▁" * n, "▁" * n + "\n"]
    want = [e.ids for e in bpe.encode_batch(probes, add_special_tokens=False)]
    for text, ids in zip(probes, want, strict=True):
        got = spm_encode(text, index, scores, byte_ids)
        if got != ids:
            raise GGUFError(
                f"{where}: no per-token scores reproduce this tokenizer's merges in llama.cpp (on {text!r}: "
                f"{[tokens[i] for i in got]} instead of {[tokens[i] for i in ids]}); ship tokenizer.model"
            )
