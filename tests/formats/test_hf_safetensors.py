"""The safetensors header validator: every defect is one CheckpointError line naming the file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qkiln.errors import CheckpointError
from qkiln.formats import safetensors_check
from qkiln.formats.safetensors_check import read_header


def raw_file(path, header: dict | bytes, data: bytes = b"", *, length: int | None = None):
    """A safetensors file made by hand, so each field can be wrong on purpose."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if length is None else length) + hb + data)
    return path


def entry(dtype="F32", shape=(2, 3), offsets=(0, 24)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def test_valid_file_matches_the_safetensors_library(tmp_path):
    arrays = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.float16),
        "c": np.zeros((0, 4), np.float32),
        "d": np.array(7, dtype=np.int64),
    }
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt"})
    h = read_header(path)
    assert h.metadata == {"format": "pt"}
    assert h.file_size == path.stat().st_size
    assert set(h.tensors) == set(arrays)
    ref = load_file(str(path))
    blob = path.read_bytes()
    for name, e in h.tensors.items():
        assert e.shape == arrays[name].shape
        got = np.frombuffer(blob[e.offset : e.offset + e.nbytes], dtype=ref[name].dtype).reshape(e.shape)
        np.testing.assert_array_equal(got, ref[name])


def test_too_short(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=r"m\.safetensors: file is 2 bytes, too short"):
        read_header(p)


def test_header_length_larger_than_file(tmp_path):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry()}, bytes(24), length=10_000)
    with pytest.raises(CheckpointError, match=r"header length 10000 is larger than the file \(\d+ bytes\)"):
        read_header(p)


def test_header_length_over_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_check, "MAX_HEADER_BYTES", 16)
    p = raw_file(tmp_path / "m.safetensors", {"a": entry()}, bytes(24))
    with pytest.raises(CheckpointError, match="exceeds 16 bytes"):
        read_header(p)


@pytest.mark.parametrize(
    ("header", "msg"),
    [
        (b"{not json", "header is not valid JSON"),
        (b"\xff\xfe{}", "header is not valid JSON"),
        (b"[1, 2]", "header must be a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "appears twice"),
        ({"a": entry(dtype="Q4")}, r"tensor 'a' has unknown dtype 'Q4'"),
        ({"a": entry(shape=(2, -3))}, r"tensor 'a' has an invalid shape \[2, -3\]"),
        ({"a": entry(shape=(2, 1.5))}, "invalid shape"),
        ({"a": entry(offsets=(0,))}, r"invalid data_offsets \[0\]"),
        ({"a": entry(offsets=(24, 0))}, r"data_offsets \[24, 0\] with end before begin"),
        ({"a": entry(offsets=(0, 20))}, r"span 20 bytes but shape \(2, 3\) of F32 needs 24"),
        ({"a": entry(dtype="F4", shape=(3,), offsets=(0, 1))}, "of F4 needs 1.5"),
        ({"a": "nope"}, "must be a JSON object with dtype"),
        ({"__metadata__": {"k": 1}, "a": entry()}, "__metadata__ must map names to strings"),
        (
            {"a": entry(offsets=(0, 24)), "b": entry(shape=(2,), offsets=(16, 24))},
            r"tensors 'a' and 'b' overlap",
        ),
    ],
)
def test_malformed_header(tmp_path, header, msg):
    p = raw_file(tmp_path / "m.safetensors", header, bytes(64))
    with pytest.raises(CheckpointError, match=msg) as ei:
        read_header(p)
    text = str(ei.value)
    assert str(p) in text and "\n" not in text


def test_truncated_data_section(tmp_path):
    p = raw_file(tmp_path / "m.safetensors", {"a": entry(), "b": entry(shape=(4,), offsets=(24, 40))}, bytes(30))
    with pytest.raises(CheckpointError, match=r"truncated: data section has 30 bytes but tensor 'b' ends at 40"):
        read_header(p)


def test_truncated_real_file(tmp_path):
    p = tmp_path / "m.safetensors"
    save_file({"w": np.ones((16, 16), np.float32)}, str(p))
    blob = p.read_bytes()
    p.write_bytes(blob[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(p)


def test_zero_sized_tensors_and_gaps_are_fine(tmp_path):
    p = raw_file(
        tmp_path / "m.safetensors",
        {"z": entry(shape=(0,), offsets=(0, 0)), "a": entry(offsets=(8, 32))},
        bytes(32),
    )
    h = read_header(p)
    assert h.tensors["a"].offset == h.data_start + 8 and h.tensors["z"].nbytes == 0
