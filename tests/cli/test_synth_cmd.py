"""`qkiln synth`: bad input is exit 2 with nothing written; a synthetic folder converts to a GGUF that llama.cpp
loads and generates with."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qkiln.cli.main import app

runner = CliRunner()


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("args, says", [
    (["--config", "llama-9b"], "unknown --config 'llama-9b'"),
    (["--config", "llama-3-8b", "--layers", "0"], "--layers"),
    (["--config", "llama-3-8b", "--shard-size", "lots"], "--shard-size 'lots' is not a size"),
])
def test_bad_input_is_exit_2_and_writes_nothing(tmp_path, args, says):
    r = runner.invoke(app, ["synth", *args, "-o", str(tmp_path / "out")])
    assert r.exit_code == 2, r.output
    assert says in r.output and "Traceback" not in r.output
    assert _leftovers(tmp_path) == []


def test_output_that_is_a_file_is_exit_2(tmp_path):
    f = tmp_path / "taken"
    f.write_text("keep me")
    r = runner.invoke(app, ["synth", "--config", "smollm2-135m", "--layers", "1", "-o", str(f)])
    assert r.exit_code == 2 and "is a file" in r.output
    assert f.read_text() == "keep me" and _leftovers(tmp_path) == ["taken"]


def test_synth_smollm2_one_layer_json(tmp_path):
    r = runner.invoke(app, ["synth", "--config", "smollm2-135m", "--layers", "1", "--seed", "3", "-o",
                            str(tmp_path / "s"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["layers"] == 1 and doc["seed"] == 3 and doc["shards"] == ["model-00001-of-00001.safetensors"]
    assert doc["weight_bytes"] == (49152 * 576 + 576 * (576 + 192 * 2 + 576 + 3 * 1536) + 2 * 576 + 576) * 2


@pytest.mark.llamacpp
def test_synth_converts_to_a_gguf_llama_cpp_runs(tmp_path):
    """A llama-3.2-1b-shaped synth (real vocabulary, llama3 rope, tied table; width reduced to keep the disk
    under 100 MB) -> `qkiln convert --to gguf` -> llama.cpp loads it and generates tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    from qkiln.pipeline.synth import write_synth

    narrow = {"hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4, "num_key_value_heads": 1}
    src = tmp_path / "synth"
    write_synth(src, "llama-3.2-1b", layers=2, overrides=narrow)
    out = tmp_path / "synth.gguf"
    r = runner.invoke(app, ["convert", "--model", str(src), "--to", "gguf", "--scheme", "q4_k_m", "-o", str(out)])
    assert r.exit_code == 0, r.output
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, verbose=False, seed=0)
    assert llm.n_vocab() == 128256
    got = llm("Hello world", max_tokens=6, temperature=0)
    assert got["usage"]["completion_tokens"] >= 1, got
    ids = llm.tokenize(b"Hello world", add_bos=False, special=True)
    assert ids and max(ids) < 49152  # the demo's BPE, not the padding


def _synth_peak_rss(args: list[str]) -> int:
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-P", "-m", "qkiln.cli.main", "synth", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0
    return int(usage.ru_maxrss) * 1024


@pytest.mark.slow
def test_memory_does_not_grow_with_the_layers(tmp_path):
    """Streaming: 1 and 8 layers of smollm2-135m (65 and 112 MB on disk) peak at the same RSS (measured 198
    and 201 MiB: the interpreter, the tokenizer's JSON and the 57 MB embedding with one generation chunk)."""
    one = _synth_peak_rss(["--config", "smollm2-135m", "--layers", "1", "-o", str(tmp_path / "one")])
    eight = _synth_peak_rss(["--config", "smollm2-135m", "--layers", "8", "-o", str(tmp_path / "eight")])
    assert abs(eight - one) < 24 * 2**20, (one, eight)  # 7 more layers are 47 MB of weights
