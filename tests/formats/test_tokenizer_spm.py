"""SentencePiece-style vocabularies in GGUF: scores that make llama.cpp tokenize as the model's tokenizer.

Two real vocabularies (spm_data.py): Llama 2's (tokenizer.json only: scores from the merge ranks) and a
trained SentencePiece BPE tokenizer.model (its own scores). Without llama.cpp the checks run qkiln's replica
of llama.cpp's encoder; the `llamacpp` tests run llama.cpp itself on the converted GGUF.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from gguf import TokenType

from qkiln.errors import GGUFError
from qkiln.formats.sentencepiece_model import read_model
from qkiln.formats.tokenizer_spm import (
    SCORES_FROM_MERGES,
    SCORES_FROM_MODEL,
    check_scores_reproduce_merges,
    spm_encode,
)
from qkiln.formats.tokenizer_to_gguf import tokenizer_from_folder


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


spm_data = _load("_spm_data", Path(__file__).resolve().parent / "spm_data.py")


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> Path:
    return spm_data.write_llama2_tokenizer(tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return spm_data.write_trained_sentencepiece(tmp_path_factory.mktemp("spm"))


def _hf(folder: Path):
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))


def _replica(g):
    """qkiln's replica of llama.cpp's SPM tokenize(text, add_bos=False, special=False) for text without specials."""
    index = {t: i for i, t in enumerate(g.tokens)}
    byte_ids = [index[f"<0x{b:02X}>"] for b in range(256)]

    def encode(text: str) -> list[int]:
        escaped = ("▁" if g.add_space_prefix else "") + text.replace(" ", "▁")
        return spm_encode(escaped, index, g.scores, byte_ids) if text else []

    return encode


def test_llama2_reference_ids(llama2):
    """The rebuilt tokenizer.json gives llama-tokenizer-js's own documented ids."""
    assert _hf(llama2).encode("Hello world!").ids == [1, 15043, 3186, 29991]


def test_llama2_scores_come_from_merge_ranks(llama2):
    g = tokenizer_from_folder(llama2, 32000)
    assert g.model == "llama" and g.scores_source == SCORES_FROM_MERGES and g.add_space_prefix
    assert g.token_types[:4] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.BYTE]
    assert g.token_types.count(TokenType.BYTE) == 256
    assert (g.bos_id, g.eos_id, g.unk_id, g.add_bos, g.add_eos) == (1, 2, 0, True, False)
    ids = {t: i for i, t in enumerate(g.tokens)}
    assert g.scores[ids["▁t"]] == 0.0  # the first merge
    assert g.scores[ids["▁▁"]] < g.scores[ids["▁r"]]  # whitespace pieces come last, whatever their ids


def test_minus_id_scores_are_refused_for_llama2(llama2):
    """The old rule (score = -id) is caught by the exactness check, on a run of spaces."""
    g = tokenizer_from_folder(llama2, 32000)
    doc = json.loads((llama2 / "tokenizer.json").read_text())
    merges = [tuple(m.split(" ")) for m in doc["model"]["merges"]]
    minus_id = [0.0 if k != TokenType.NORMAL else -float(i) for i, k in enumerate(g.token_types)]
    with pytest.raises(GGUFError, match="no per-token scores reproduce"):
        check_scores_reproduce_merges(g.tokens, g.token_types, minus_id, merges, "<unk>", "t")


def test_llama2_replica_equals_hf_on_corpus(llama2):
    """Without llama.cpp: its encoder (replica) with the derived scores == tokenizers, text by text."""
    g = tokenizer_from_folder(llama2, 32000)
    hf, replica = _hf(llama2), _replica(g)
    texts = [t for t in spm_data.corpus() if "<" not in t]
    for text in texts:
        assert replica(text) == hf.encode(text, add_special_tokens=False).ids, text[:60]


def test_tokenizer_model_is_read_as_sentencepiece_reads_it(trained):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    m = read_model(trained / "tokenizer.model")
    assert m.pieces == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert m.scores == [sp.get_score(i) for i in range(sp.get_piece_size())]
    kinds = {2: sp.is_unknown, 3: sp.is_control, 6: sp.is_byte}
    for i, k in enumerate(m.types):
        assert k in (1, 4) or kinds[k](i)
    assert m.types.count(4) == 1  # <|user|>
    assert (m.model_type, m.byte_fallback, m.add_dummy_prefix, m.remove_extra_whitespaces) == ("bpe", True, True, False)


def test_tokenizer_model_scores_are_used(trained):
    g = tokenizer_from_folder(trained, 2048)
    m = read_model(trained / "tokenizer.model")
    assert g.scores_source == SCORES_FROM_MODEL
    assert g.scores[: len(m.scores)] == m.scores
    assert g.token_types[len(m.scores):] == [TokenType.UNUSED] * (2048 - len(m.scores))
    assert g.tokens[len(m.scores)] == f"[PAD{len(m.scores)}]"


# -- refusals: what llama.cpp cannot reproduce is not written ---------------------------------------------


def _edit(folder: Path, dest: Path, fn) -> Path:
    dest.mkdir()
    for f in folder.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    doc = json.loads((dest / "tokenizer.json").read_text())
    fn(doc)
    (dest / "tokenizer.json").write_text(json.dumps(doc, ensure_ascii=False))
    return dest


def _drop_merge(doc):
    doc["model"]["merges"].remove("▁ t")


def _metaspace(doc):
    doc["normalizer"] = None
    doc["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}


def _nfkc(doc):
    doc["normalizer"]["normalizers"].insert(0, {"type": "NFKC"})


def _normalized_added(doc):
    doc["added_tokens"][1]["normalized"] = True


@pytest.mark.parametrize(("edit", "match"), [
    (_drop_merge, "is not a merge; llama.cpp would merge it"),
    (_metaspace, "places the \"▁\" prefix differently"),
    (_nfkc, "normalizer NFKC.*no llama.cpp equivalent"),
    (_normalized_added, "has normalized"),
])
def test_inexpressible_tokenizers_are_refused(trained, tmp_path, edit, match):
    folder = _edit(trained, tmp_path / "t", edit)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(GGUFError, match=match):
        tokenizer_from_folder(folder, 2048)


@pytest.mark.parametrize(("options", "match"), [
    ({"model_type": "unigram"}, "model type unigram"),
    ({"normalization_rule_name": "nmt_nfkc"}, "normalization rule"),
    ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
])
def test_inexpressible_tokenizer_models_are_refused(tmp_path, options, match):
    folder = spm_data.write_trained_sentencepiece(tmp_path / "m", vocab_size=600, **options)
    with pytest.raises(GGUFError, match=match):
        tokenizer_from_folder(folder, 1024)


def test_tokenizer_model_that_disagrees_with_tokenizer_json_is_refused(trained, tmp_path):
    def swap(doc):
        v = doc["model"]["vocab"]
        a, b = sorted(v, key=v.get)[400:402]
        v[a], v[b] = v[b], v[a]
    folder = _edit(trained, tmp_path / "t", swap)
    with pytest.raises(GGUFError, match="the two tokenizers disagree"):
        tokenizer_from_folder(folder, 2048)


def test_convert_refuses_with_exit_2_and_writes_nothing(make_checkpoint, tiny_config, trained, tmp_path):
    from typer.testing import CliRunner

    from qkiln.cli.main import app

    ckpt = make_checkpoint(tiny_config(vocab_size=2048), tokenizer=False)
    src = _edit(trained, tmp_path / "t", _drop_merge)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).write_bytes((src / f).read_bytes())
    out = tmp_path / "m.gguf"
    r = CliRunner().invoke(app, ["convert", "--model", str(ckpt), "--to", "gguf", "--scheme", "f16", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "is not a merge" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_info_says_where_scores_come_from(make_checkpoint, tiny_config, trained):
    from typer.testing import CliRunner

    from qkiln.cli.main import app

    ckpt = make_checkpoint(tiny_config(vocab_size=2048), tokenizer=False)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / f).write_bytes((trained / f).read_bytes())
    r = CliRunner().invoke(app, ["info", "--model", str(ckpt), "--json"])
    assert json.loads(r.stdout)["tokenizer"]["gguf"] == "llama, scores from tokenizer.json merges"
    (ckpt / "tokenizer.model").write_bytes((trained / "tokenizer.model").read_bytes())
    r = CliRunner().invoke(app, ["info", "--model", str(ckpt)])
    assert "GGUF llama, scores from tokenizer.model" in r.stdout


# -- llama.cpp itself ------------------------------------------------------------------------------------


def _convert(make_checkpoint, tiny_config, tokenizer_dir: Path, vocab_size: int, tmp_path: Path, files) -> Path:
    from qkiln.pipeline.convert import convert_to_gguf

    ckpt = make_checkpoint(tiny_config(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2), tokenizer=False)
    for f in files:
        (ckpt / f).write_bytes((tokenizer_dir / f).read_bytes())
    out = tmp_path / "m.gguf"
    convert_to_gguf(ckpt, out, "f16")
    return out


def _compare_with_llama_cpp(gguf_path: Path, encode) -> int:
    """Every corpus text: llama.cpp's ids == `encode(text, add_bos)`, special tokens parsed; returns tokens seen."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    n = 0
    texts = spm_data.corpus()
    for text in texts:
        want = encode(text, False)
        got = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        assert got == want, text[:80]
        n += len(want)
    for text in texts[:40]:
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == encode(text, True), text[:80]
    whole = "\n".join(texts)
    assert llm.tokenize(whole.encode("utf-8"), add_bos=False, special=True) == encode(whole, False)
    return n


@pytest.mark.llamacpp
def test_llama2_vocabulary_tokenizes_in_llama_cpp_as_in_hf(llama2, make_checkpoint, tiny_config, tmp_path):
    from qkiln.formats.gguf_read import read_gguf

    out = _convert(make_checkpoint, tiny_config, llama2, 32000, tmp_path, ["tokenizer.json", "tokenizer_config.json"])
    meta = read_gguf(out).metadata
    assert meta["qkiln.tokenizer.scores"] == SCORES_FROM_MERGES
    hf = _hf(llama2)
    n = _compare_with_llama_cpp(out, lambda s, bos: hf.encode(s, add_special_tokens=bos).ids)
    assert n > 25_000  # and as many again in the texts joined


@pytest.mark.llamacpp
def test_tokenizer_model_tokenizes_in_llama_cpp_as_sentencepiece_and_hf(trained, make_checkpoint, tiny_config,
                                                                       tmp_path):
    import sentencepiece

    from qkiln.formats.gguf_read import read_gguf

    out = _convert(make_checkpoint, tiny_config, trained, 2048, tmp_path,
                   ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"])
    assert read_gguf(out).metadata["qkiln.tokenizer.scores"] == SCORES_FROM_MODEL
    hf = _hf(trained)
    _compare_with_llama_cpp(out, lambda s, bos: hf.encode(s, add_special_tokens=bos).ids)
    # and SentencePiece itself, on texts without special tokens (it does not split them off)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(trained / "tokenizer.model"))
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    for text in spm_data.corpus():
        if text and "<" not in text:
            assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == sp.encode(text), text[:80]
