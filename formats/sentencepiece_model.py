"""Read a SentencePiece `tokenizer.model` (a serialized `ModelProto`) without the sentencepiece package.

Only what a GGUF tokenizer needs: each piece's text, score and type, the model type, byte fallback and the
normalizer flags that decide whether llama.cpp can reproduce the tokenization. The protobuf wire format is
small enough to read directly (field numbers from sentencepiece_model.proto), so conversion needs no
sentencepiece/protobuf schema at run time.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

from qkiln.errors import GGUFError

# sentencepiece_model.proto: ModelProto.SentencePiece.Type (NORMAL is the default when the field is absent).
PIECE_NORMAL, PIECE_UNKNOWN, PIECE_CONTROL, PIECE_USER_DEFINED, PIECE_BYTE, PIECE_UNUSED = 1, 2, 3, 4, 6, 5
# TrainerSpec.ModelType
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclasses.dataclass(frozen=True)
class SentencePieceModel:
    """The parts of a ModelProto a GGUF `llama` vocabulary is made from; lists are indexed by piece id."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # PIECE_* values
    model_type: str  # "unigram" (the proto default), "bpe", "word", "char"
    byte_fallback: bool
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool
    precompiled_charsmap: bytes
    normalizer_name: str


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of one message: ints for varint/fixed fields, bytes for length-delimited ones."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        out.append((field, value))
    return out


def _float32(bits: int) -> float:
    return float(struct.unpack("<f", bits.to_bytes(4, "little"))[0])


def parse_model(data: bytes) -> SentencePieceModel:
    """A ModelProto's pieces and flags; ValueError on bytes that are not one."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    for field, value in _fields(data):
        if field == 1 and isinstance(value, bytes):
            piece = dict(_fields(value))
            text, score, kind = piece.get(1, b""), piece.get(2, 0), piece.get(3, PIECE_NORMAL)
            if not isinstance(text, bytes) or not isinstance(score, int) or not isinstance(kind, int):
                raise ValueError("malformed SentencePiece entry")
            pieces.append(text.decode("utf-8"))
            scores.append(_float32(score))
            types.append(kind)
        elif field == 2 and isinstance(value, bytes):
            trainer = dict(_fields(value))
        elif field == 3 and isinstance(value, bytes):
            normalizer = dict(_fields(value))
    if not pieces:
        raise ValueError("no pieces")

    def flag(spec: dict[int, int | bytes], field: int, default: bool) -> bool:
        v = spec.get(field, int(default))
        return bool(v) if isinstance(v, int) else default

    charsmap = normalizer.get(2, b"")
    name = normalizer.get(1, b"")
    model_type = trainer.get(3, 1)
    return SentencePieceModel(
        pieces=pieces,
        scores=scores,
        types=types,
        model_type=MODEL_TYPES.get(model_type, str(model_type)) if isinstance(model_type, int) else "unigram",
        byte_fallback=flag(trainer, 35, False),
        add_dummy_prefix=flag(normalizer, 3, True),
        remove_extra_whitespaces=flag(normalizer, 4, True),
        escape_whitespaces=flag(normalizer, 5, True),
        precompiled_charsmap=charsmap if isinstance(charsmap, bytes) else b"",
        normalizer_name=name.decode("utf-8", "replace") if isinstance(name, bytes) else "",
    )


def read_model(path: Path) -> SentencePieceModel:
    """`parse_model` of a file, with GGUFError naming the file when it cannot be read."""
    try:
        return parse_model(path.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path}: not a readable SentencePiece model ({e})") from None
