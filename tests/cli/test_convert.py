"""`qkiln convert --to gguf` and `qkiln inspect`: determinism, summaries, and every bad input as exit 2
with no file left at the destination (including a run killed mid-write)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

runner = CliRunner()


def convert(*args: str):
    return runner.invoke(app, ["convert", *args])


def test_two_conversions_give_identical_bytes(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    for out in (a, b):
        r = convert("--model", str(ckpt), "--scheme", "q4_0", "-o", str(out))
        assert r.exit_code == 0, r.output
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size > 10_000


def test_convert_json_summary_and_inspect(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    out = tmp_path / "m.gguf"
    r = convert("--model", str(ckpt), "--scheme", "q8_0", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["tensor_types"] == {"F32": 5, "Q8_0": 16}
    assert summary["fallbacks"] == []

    r = runner.invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["types"]["Q8_0"]["bits_per_weight"] == 8.5
    assert doc["metadata"]["qkiln.scheme"] == "q8_0"
    assert doc["metadata"]["general.architecture"] == "llama"
    assert doc["metadata"]["tokenizer.ggml.pre"] == "gpt-2"
    assert doc["metadata"]["tokenizer.ggml.tokens"]["length"] == 512
    assert doc["n_tensors"] == 21
    assert {t["name"] for t in doc["tensors"]} >= {"token_embd.weight", "output.weight", "blk.1.ffn_down.weight"}
    assert runner.invoke(app, ["inspect", str(out)]).exit_code == 0


def test_fallback_is_reported_and_recorded(make_checkpoint, tmp_path):
    """64-wide rows do not fit a 256-weight K-quant block: llama.cpp's fallback (Q4_K -> Q5_0) is taken."""
    ckpt = make_checkpoint()
    out = tmp_path / "m.gguf"
    r = convert("--model", str(ckpt), "--scheme", "q4_k", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert any("q_proj" in f and "q5_0" in f for f in summary["fallbacks"])
    assert "fallback" in r.stderr
    meta = gguf.GGUFReader(out).fields["qkiln.fallbacks"].contents()
    assert meta == summary["fallbacks"]


def test_fallbacks_are_one_line_per_rule_unless_verbose(make_checkpoint, tmp_path):
    """Q4_K on rows of 64 and 128: 16 tensors fall back by two rules -> two counted lines; --verbose lists 16."""
    ckpt = make_checkpoint()
    r = convert("--model", str(ckpt), "--scheme", "q4_k", "-o", str(tmp_path / "a.gguf"), "--uniform")
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("fallback")]
    assert lines == [
        "fallback 14 tensors: row length 64 is not a multiple of q4_k's block of 256; using q5_0",
        "fallback 2 tensors: row length 128 is not a multiple of q4_k's block of 256; using q5_0",
    ]
    r = convert("--model", str(ckpt), "--scheme", "q4_k", "-o", str(tmp_path / "b.gguf"), "--uniform", "--verbose")
    lines = [line for line in r.stderr.splitlines() if line.startswith("fallback")]
    assert len(lines) == 16 and lines[0] == "fallback lm_head.weight: row length 64 is not a multiple of q4_k's block of 256; using q5_0"


def test_short_calibration_text_is_said_once_with_what_to_pass(make_checkpoint, tmp_path):
    calib = tmp_path / "short.txt"
    calib.write_text(Path("/usr/share/common-licenses/LGPL-2.1").read_text()[:6000])
    r = convert("--model", str(make_checkpoint()), "--scheme", "q4_0", "--algo", "gptq", "--calib", str(calib),
                "--seq-len", "64", "-o", str(tmp_path / "m.gguf"))
    assert r.exit_code == 0, r.output
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "not the 128 asked for" in notes[0] and "pass --samples" in notes[0]


def test_calibrated_conversion_records_provenance(make_checkpoint, tmp_path):
    import hashlib

    calib = Path("/usr/share/common-licenses/LGPL-2.1")
    out = tmp_path / "m.gguf"
    r = convert("--model", str(make_checkpoint()), "--scheme", "q4_0", "--algo", "gptq", "--calib", str(calib),
                "--samples", "4", "--seq-len", "64", "-o", str(out))
    assert r.exit_code == 0, r.output
    meta = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith(("qkiln.", "general."))}
    assert meta["qkiln.algorithm"] == "gptq"
    assert meta["qkiln.scheme"] == "q4_0"
    assert meta["qkiln.calibration.sha256"] == hashlib.sha256(calib.read_bytes()).hexdigest()
    assert meta["general.file_type"] == 2 and meta["general.quantized_by"] == "qkiln"


@pytest.mark.parametrize(("args", "want", "said"), [
    (["--calib", "/usr/share/common-licenses/LGPL-2.1"], "awq+gptq", "algorithm: awq+gptq (auto: calibration text given)"),
    ([], "rtn", "algorithm: rtn (auto: no --calib)"),
    (["--algo", "rtn", "--calib", "/usr/share/common-licenses/LGPL-2.1"], "rtn", "--calib ignored"),
])
def test_the_default_algorithm_is_awq_gptq_with_calibration_text_and_rtn_without(make_checkpoint, tmp_path, args,
                                                                                   want, said):
    out = tmp_path / "m.gguf"
    r = convert("--model", str(make_checkpoint()), "--scheme", "q4_0", *args, "--samples", "4", "--seq-len", "64",
                "-o", str(out))
    assert r.exit_code == 0, r.output
    assert said in r.stderr
    assert gguf.GGUFReader(out).fields["qkiln.algorithm"].contents() == want


def test_calibrated_algorithm_without_text_is_exit_2(make_checkpoint, tmp_path):
    r = convert("--model", str(make_checkpoint()), "--scheme", "q4_0", "--algo", "gptq", "-o", str(tmp_path / "m.gguf"))
    assert r.exit_code == 2 and "--calib" in r.output


def test_import_gguf_of_a_qkiln_artifact_gives_the_checkpoint_back(make_checkpoint, tmp_path):
    """Round trip: convert (Q8_0) then import-gguf: same config, weights on the grid, same tokenizer."""
    from qkiln.formats.hf import Checkpoint
    from qkiln.quantize.registry import get_scheme
    from qkiln.quantize.rtn import quantize_rtn

    ckpt = make_checkpoint()
    out, back = tmp_path / "m.gguf", tmp_path / "back"
    assert convert("--model", str(ckpt), "--scheme", "q8_0", "-o", str(out)).exit_code == 0
    r = runner.invoke(app, ["import-gguf", str(out), "-o", str(back)])
    assert r.exit_code == 0, r.output
    src, dst = Checkpoint.open(ckpt), Checkpoint.open(back)
    assert dst.config == src.config
    for name in src.names():
        w = np.asarray(src.tensor(name))
        want = quantize_rtn(w, get_scheme("q8_0"), name=name).dequantize() if w.ndim == 2 else w
        np.testing.assert_array_equal(np.asarray(dst.tensor(name)), want, err_msg=name)
    text = "Hello  world 123 <s> naïve\n\n"
    assert dst.tokenizer().encode(text).ids == src.tokenizer().encode(text).ids


# -- bad input ------------------------------------------------------------------------------------------


def test_unknown_scheme_is_exit_2(make_checkpoint, tmp_path):
    out = tmp_path / "m.gguf"
    r = convert("--model", str(make_checkpoint()), "--scheme", "q3_z", "-o", str(out))
    assert r.exit_code == 2
    assert "unknown scheme 'q3_z'" in r.output and "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.parametrize("scheme", ["int4_g32", "fp8_e4m3fn"])
def test_scheme_without_a_ggml_block_is_exit_2(make_checkpoint, tmp_path, scheme):
    out = tmp_path / "m.gguf"
    r = convert("--model", str(make_checkpoint()), "--scheme", scheme, "-o", str(out))
    assert r.exit_code == 2
    assert "GGUF has no block type" in r.output
    assert not out.exists()


def test_unknown_algorithm_is_a_usage_error(make_checkpoint, tmp_path):
    r = convert("--model", str(make_checkpoint()), "--algo", "magic", "-o", str(tmp_path / "m.gguf"))
    assert r.exit_code == 2


def test_vocabulary_that_cannot_be_expressed_is_exit_2(make_checkpoint, tmp_path):
    ckpt = make_checkpoint()
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "m.gguf"
    r = convert("--model", str(ckpt), "--scheme", "f16", "-o", str(out))
    assert r.exit_code == 2
    assert "cannot be expressed" in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_destination_folder_missing_is_exit_2(make_checkpoint, tmp_path):
    out = tmp_path / "no" / "such" / "m.gguf"
    r = convert("--model", str(make_checkpoint()), "--scheme", "f16", "-o", str(out))
    assert r.exit_code == 2
    assert "does not exist" in r.output


def test_destination_not_writable_is_exit_2(make_checkpoint, tmp_path):
    """A destination whose folder refuses writes (a read-only bind is not available here: /proc is)."""
    r = convert("--model", str(make_checkpoint()), "--scheme", "f16", "-o", "/proc/qkiln-test.gguf")
    assert r.exit_code == 2, r.output
    assert "cannot write" in r.output and "Traceback" not in r.output


def test_killed_mid_write_leaves_no_file_at_destination(make_checkpoint, tmp_path):
    """SIGKILL while tensors are being written: the destination never exists (only a hidden .partial file)."""
    ckpt = make_checkpoint()
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    script = textwrap.dedent(
        f"""
        import time
        from qkiln.formats import gguf_write
        real = gguf_write.float_bytes
        def slow(w, t):
            time.sleep(0.2)
            return real(w, t)
        gguf_write.float_bytes = slow
        from qkiln.pipeline.convert import convert_to_gguf
        convert_to_gguf({str(ckpt)!r}, {str(out)!r}, "f32")
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        partial: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            partial = [p for p in out.parent.iterdir() if ".partial-" in p.name and p.stat().st_size > 0]
            if partial:
                break
            time.sleep(0.05)
        assert partial, "the writer never started"
        time.sleep(0.3)  # a few tensors in
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert all(p.name.startswith(".m.gguf.partial-") for p in out.parent.iterdir())


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", b"not a gguf at all"])
def test_inspect_bad_file_is_exit_2(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and "Traceback" not in r.output


@pytest.mark.parametrize(("to", "scheme", "algo"), [("gguf", "q4_0", "gptq"), ("onnx", "int4_g32", "awq+gptq")])
def test_calibrated_bytes_do_not_depend_on_the_blas_thread_count(tmp_path, to, scheme, algo):
    """The same calibrated conversion on 1 and on 2 BLAS threads (another machine's core count) gives the same
    bytes: every BLAS that calibration calls — NumPy's and scipy's own OpenBLAS, which sums Hessians and factors
    them — runs single-threaded (once scipy's was left unlimited and the bytes differed; on an AVX2 host the
    AWQ factors' Cholesky, the tied head's Hessian and its GPTQ updates did too: the int4 ONNX case, whose head
    is GPTQ'd). The demo model: a tiny model's products are too small for OpenBLAS to thread."""
    outs = []
    for threads in ("1", "2"):
        out = tmp_path / f"t{threads}"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        r = subprocess.run([sys.executable, "-P", "-m", "qkiln.cli.main", "convert", "--to", to, "--scheme", scheme,
                            "--algo", algo, "--calib", "/usr/share/common-licenses/LGPL-2.1", "--samples", "2",
                            "--seq-len", "128", "-o", str(out)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        files = [f for f in sorted(out.rglob("*")) if f.is_file()] if out.is_dir() else [out]  # a GGUF or a folder
        outs.append({str(f.relative_to(tmp_path / f"t{threads}")): f.read_bytes() for f in files})
    assert outs[0] == outs[1]
