"""The writers stream: a tensor larger than a block of rows is quantized, packed and written a block at a time
(GGUF), kept-in-float tensors are converted a block at a time and GPU shards are assembled from a spill file —
and none of it changes a byte."""

import hashlib
from pathlib import Path

import pytest

from qkiln.model import source
from qkiln.pipeline.convert import convert_to_gguf
from qkiln.pipeline.gpu import convert_to_gpu


def _digests(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def bf16_checkpoint(make_checkpoint, tiny_config):
    return make_checkpoint(tiny_config(vocab_size=512, hidden_size=128, intermediate_size=256), dtype="BF16",
                           tied=False)


@pytest.mark.parametrize("scheme", ["q4_k_m", "q8_0", "f16"])
def test_gguf_written_in_row_blocks_has_the_same_bytes(tmp_path, monkeypatch, bf16_checkpoint, scheme):
    whole = convert_to_gguf(bf16_checkpoint, tmp_path / "a.gguf", scheme).path
    monkeypatch.setattr(source, "ROW_BLOCK_FLOATS", 3 * 128 + 5)  # 3 rows a block: partial last blocks everywhere
    blocks = convert_to_gguf(bf16_checkpoint, tmp_path / "b.gguf", scheme).path
    assert whole.read_bytes() == blocks.read_bytes()


@pytest.mark.parametrize("target, scheme", [("compressed-tensors", "int4_g64"), ("gptq", "int4_g64")])
def test_gpu_folder_from_blocks_and_spill_has_the_same_bytes(tmp_path, monkeypatch, bf16_checkpoint, target, scheme):
    convert_to_gpu(bf16_checkpoint, tmp_path / "a", target, scheme)
    monkeypatch.setattr(source, "ROW_BLOCK_FLOATS", 3 * 128 + 5)
    convert_to_gpu(bf16_checkpoint, tmp_path / "b", target, scheme)
    a = {n.removeprefix("a/"): d for n, d in _digests(tmp_path / "a").items()}
    b = {n.removeprefix("b/"): d for n, d in _digests(tmp_path / "b").items()}
    assert a == b and not any(".spill" in n for n in a)
    # several shards: each is assembled from the spill file as it fills
    convert_to_gpu(bf16_checkpoint, tmp_path / "c", target, scheme, shard_bytes=100_000)
    shards = sorted((tmp_path / "c").glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "c" / ".spill").exists()
