"""`qkiln import-gguf`: bad inputs exit 2 with one line and leave no output folder and no .partial files."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app


def _offset_field(path: Path, tensor_name: str) -> int:
    r = gguf.GGUFReader(str(path))
    field = next(t.field for t in r.tensors if t.name == tensor_name)
    return field.offset + sum(p.nbytes for p in field.parts[:-1])


def _patch(path: Path, at: int, raw: bytes) -> Path:
    blob = bytearray(path.read_bytes())
    blob[at : at + len(raw)] = raw
    path.write_bytes(blob)
    return path


def _bad_input(kind: str, make_gguf, tmp_path: Path) -> tuple[Path, str]:
    """(file, regex of the one-line message) for each kind of bad input."""
    if kind == "not_gguf":
        p = tmp_path / "notes.txt"
        p.write_text("hello, I am not a model\n")
        return p, r"notes\.txt: not a GGUF file \(magic b'hell', expected b'GGUF'\)"
    if kind == "kv_count":
        return _patch(make_gguf(), 16, struct.pack("<Q", 2**33)), r"kv count 8589934592 is implausible for a file of \d+ bytes"
    if kind == "string_length":
        return _patch(make_gguf(), 24, struct.pack("<Q", 10**9)), r"key of metadata entry 0 at byte 24 claims 1000000000 bytes, past the end of the file"
    if kind == "tensor_offset":
        p = make_gguf()
        return (_patch(p, _offset_field(p, "blk.0.ffn_up.weight"), struct.pack("<Q", 2**30)),
                r"tensor 'blk\.0\.ffn_up\.weight' data ends at byte \d+, past the end of the file \(\d+ bytes\); the file is truncated or corrupt")
    if kind == "truncated":
        p = make_gguf()
        p.write_bytes(p.read_bytes()[:-4096])
        return p, r"data ends at byte \d+, past the end of the file \(\d+ bytes\); the file is truncated or corrupt"
    if kind == "arch":
        return make_gguf(arch="gpt2"), r"architecture 'gpt2' is not supported; qkiln imports only 'llama' GGUF files"
    if kind == "missing":
        return tmp_path / "missing.gguf", r"missing\.gguf: no such file"
    raise KeyError(kind)


KINDS = ["not_gguf", "kv_count", "string_length", "tensor_offset", "truncated", "arch", "missing"]


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial" in p.name or p.name == "out")


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_exits_2_with_one_line_and_no_output(kind, make_gguf, tmp_path):
    src, message = _bad_input(kind, make_gguf, tmp_path)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    result = CliRunner().invoke(app, ["import-gguf", str(src), "-o", str(out_parent / "out")])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in result.output
    assert _leftovers(out_parent) == []


def test_bad_input_in_a_real_process_has_no_traceback(make_gguf, tmp_path):
    src, message = _bad_input("tensor_offset", make_gguf, tmp_path)
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run([sys.executable, "-m", "qkiln.cli.main", "import-gguf", str(src), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and re.search(message, lines[0]), proc.stderr
    assert _leftovers(tmp_path) == []


def test_import_then_force_and_json(make_gguf, tmp_path):
    src = make_gguf()
    out = tmp_path / "out"
    runner = CliRunner()
    first = runner.invoke(app, ["import-gguf", str(src), "-o", str(out)])
    assert first.exit_code == 0, first.output
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    again = runner.invoke(app, ["import-gguf", str(src), "-o", str(out)])
    assert again.exit_code == 2 and "already exists; remove it or pass --force" in again.output
    forced = runner.invoke(app, ["import-gguf", str(src), "-o", str(out), "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    doc = json.loads(forced.stdout)
    assert doc["output"] == str(out) and doc["config"]["num_hidden_layers"] == 2
    assert "model.safetensors" in doc["files"] and "qkiln_source.json" in doc["files"]
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name or ".old" in p.name] == []
