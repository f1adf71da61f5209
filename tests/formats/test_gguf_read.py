"""The GGUF reader agrees with gguf-py on good files and turns every damaged file into one GGUFError line."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from qkiln.errors import GGUFError
from qkiln.formats.gguf_read import read_gguf


@pytest.fixture
def tiny(make_gguf) -> Path:
    return make_gguf()


def _field_offset(path: Path, tensor_name: str) -> int:
    """File position of `tensor_name`'s data-offset field, found with gguf-py's reader."""
    r = gguf.GGUFReader(str(path))
    field = next(t.field for t in r.tensors if t.name == tensor_name)
    return field.offset + sum(p.nbytes for p in field.parts[:-1])


def test_matches_gguf_reader(tiny):
    f = read_gguf(tiny)
    ref = gguf.GGUFReader(str(tiny))
    assert f.version == 3 and f.alignment == 32
    assert [t.name for t in ref.tensors] == list(f.tensors)
    for t in ref.tensors:
        mine = f.tensors[t.name]
        assert mine.ggml_type == t.tensor_type
        assert mine.shape == tuple(int(d) for d in reversed(t.shape))
        assert np.array_equal(mine.data, t.data.view(np.uint8).reshape(mine.data.shape))
        assert mine.nbytes == t.n_bytes
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert f.metadata[key] == pytest.approx(value) if isinstance(value, float) else f.metadata[key] == value


def test_q4_k_tensor_view_has_quant_byte_layout(tiny):
    t = read_gguf(tiny).tensors["blk.0.attn_k.weight"]
    assert t.ggml_type == gguf.GGMLQuantizationType.Q4_K
    assert t.shape == (128, 256) and t.data.shape == (128, 144) and t.data.dtype == np.uint8
    assert gguf.quants.dequantize(t.data, t.ggml_type).shape == (128, 256)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match=r"x\.bin: not a GGUF file \(magic b'PK\\x03\\x04', expected b'GGUF'\)"):
        read_gguf(p)


@pytest.mark.parametrize("content", [b"", b"GG", b"GGUF", b"GGUF\x03\0\0\0"])
def test_too_short(tmp_path, content):
    p = tmp_path / "short.gguf"
    p.write_bytes(content)
    with pytest.raises(GGUFError, match=r"short\.gguf: "):
        read_gguf(p)


def test_missing_and_folder(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="is a folder"):
        read_gguf(tmp_path)


def test_unsupported_versions(tiny):
    blob = bytearray(tiny.read_bytes())
    blob[4:8] = struct.pack("<I", 1)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match="GGUF version 1 is not supported"):
        read_gguf(tiny)
    blob[4:8] = struct.pack(">I", 3)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf(tiny)


def test_kv_count_past_end(tiny):
    blob = bytearray(tiny.read_bytes())
    blob[16:24] = struct.pack("<Q", 10**12)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"kv count 1000000000000 is implausible for a file of \d+ bytes; the file is truncated or corrupt"):
        read_gguf(tiny)


def test_tensor_count_past_end(tiny):
    blob = bytearray(tiny.read_bytes())
    blob[8:16] = struct.pack("<Q", 2**40)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"tensor count \d+ is implausible"):
        read_gguf(tiny)


def test_string_length_past_end(tiny):
    blob = bytearray(tiny.read_bytes())
    blob[24:32] = struct.pack("<Q", 2**50)  # the first key's length
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"key of metadata entry 0 at byte 24 claims \d+ bytes, past the end of the file"):
        read_gguf(tiny)


def test_tensor_offset_past_end(tiny):
    at = _field_offset(tiny, "blk.1.ffn_down.weight")
    blob = bytearray(tiny.read_bytes())
    blob[at : at + 8] = struct.pack("<Q", 32 * 10**6)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match=r"tensor 'blk\.1\.ffn_down\.weight' data ends at byte \d+, past the end of the file \(\d+ bytes\); the file is truncated or corrupt"):
        read_gguf(tiny)


def test_misaligned_offset(tiny):
    at = _field_offset(tiny, "output_norm.weight")
    blob = bytearray(tiny.read_bytes())
    blob[at : at + 8] = struct.pack("<Q", struct.unpack_from("<Q", blob, at)[0] + 4)
    tiny.write_bytes(blob)
    with pytest.raises(GGUFError, match="not a multiple of the alignment 32"):
        read_gguf(tiny)


def test_truncated_data(tiny):
    blob = tiny.read_bytes()
    tiny.write_bytes(blob[:-1000])
    with pytest.raises(GGUFError, match=r"data ends at byte \d+, past the end of the file"):
        read_gguf(tiny)


def test_every_truncation_is_a_gguf_error(tiny):
    """Cut the file at many lengths: the reader either fails with GGUFError or (never) crashes otherwise."""
    blob = tiny.read_bytes()
    header_end = read_gguf(tiny).data_start
    cuts = [*range(0, header_end, max(1, header_end // 150)), header_end, len(blob) - 1]
    for n in cuts:
        tiny.write_bytes(blob[:n])
        with pytest.raises(GGUFError):
            read_gguf(tiny)


def test_random_header_damage_never_crashes(tiny):
    """Random byte changes in the header give GGUFError or a file that still parses; nothing else."""
    blob = tiny.read_bytes()
    header_end = read_gguf(tiny).data_start
    rng = random.Random(0)
    errors = 0
    for _ in range(120):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(header_end)] = rng.randrange(256)
        tiny.write_bytes(damaged)
        try:
            read_gguf(tiny)
        except GGUFError as e:
            errors += 1
            assert "\n" not in str(e)
    assert errors > 0


def test_bad_alignment_value(make_gguf):
    path = make_gguf(extra_meta=lambda w: w.add_uint32("general.alignment", 24))
    with pytest.raises(GGUFError, match=r"general\.alignment 24 is not a positive power of two"):
        read_gguf(path)
