"""Bad checkpoint folders: each is refused by Checkpoint.open with one line saying what is wrong."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qkiln.errors import CheckpointError
from qkiln.formats.hf import Checkpoint

BAD_KINDS = [
    "truncated", "header_too_long", "index_escapes", "missing_tensor", "wrong_shape",
    "unsupported_arch", "pickle_only", "not_a_folder", "no_config",
]


def _refused(path, pattern):
    with pytest.raises(CheckpointError, match=pattern) as ei:
        Checkpoint.open(path)
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_every_listed_kind_is_tested(bad_checkpoint):
    assert sorted(BAD_KINDS) == sorted(bad_checkpoint.kinds)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_is_refused_with_one_line(bad_checkpoint, kind):
    _refused(bad_checkpoint(kind), bad_checkpoint.message(kind))


def test_pickle_is_never_unpickled(bad_checkpoint, tmp_path):
    _refused(bad_checkpoint("pickle_only"), "pickled")
    assert not (tmp_path / "UNPICKLED").exists()
    # the marker really would appear if something unpickled the file (the test is not vacuous)
    import pickle

    pickle.loads((tmp_path / "pickle_only" / "pytorch_model.bin").read_bytes())
    assert (tmp_path / "UNPICKLED").exists()


@pytest.mark.parametrize("fname", ["model.pt", "consolidated.pth", "weights.ckpt"])
def test_other_pickle_suffixes_are_refused(tmp_path, tiny_config, fname):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    (tmp_path / fname).write_bytes(b"\x80\x04N.")
    _refused(tmp_path, rf"only pickled weights \({fname}\)")


def test_missing_folder(tmp_path):
    _refused(tmp_path / "nope", "does not exist")


def test_gguf_file_gets_an_import_hint(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    _refused(f, "import-gguf")


def test_invalid_config_json(make_checkpoint):
    path = make_checkpoint()
    (path / "config.json").write_text("{oops")
    _refused(path, "config.json is not valid JSON")


@pytest.mark.parametrize(
    "field",
    [
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},  # incomplete llama3 scaling
        {"rope_scaling": [1, 2]},
        {"rms_norm_eps": "tiny"},
        {"max_position_embeddings": None},
    ],
)
def test_malformed_config_field_is_a_checkpoint_error(make_checkpoint, field):
    path = make_checkpoint()
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(field)
    (path / "config.json").write_text(json.dumps(cfg))
    _refused(path, "config.json( has a malformed field|: rope_scaling)")


def test_no_weights_at_all(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    _refused(tmp_path, "has no weights: expected model.safetensors or model.safetensors.index.json")


def test_shards_without_index(make_checkpoint):
    path = make_checkpoint(shards=2)
    (path / "model.safetensors.index.json").unlink()
    _refused(path, r"has model-00001-of-00002\.safetensors, model-00002-of-00002\.safetensors but neither")


def _rewrite_index(path, fn):
    p = path / "model.safetensors.index.json"
    index = json.loads(p.read_text())
    fn(index)
    p.write_text(json.dumps(index))


@pytest.mark.parametrize("target", ["/etc/passwd", "sub/../../x.safetensors", ""])
def test_index_names_outside_or_empty_are_refused(make_checkpoint, target):
    path = make_checkpoint(shards=2)
    _rewrite_index(path, lambda ix: ix["weight_map"].update({"model.norm.weight": target}))
    _refused(path, "outside the checkpoint folder")


def test_index_symlink_escaping_the_folder_is_refused(make_checkpoint, tmp_path):
    path = make_checkpoint(shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(shard, outside)
    shard.symlink_to(outside)
    _refused(path, r"is a symlink to .*elsewhere\.safetensors, outside the checkpoint folder")


def test_single_file_symlink_escaping_the_folder_is_refused(make_checkpoint, tmp_path):
    path = make_checkpoint()
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(path / "model.safetensors", outside)
    (path / "model.safetensors").symlink_to(outside)
    _refused(path, "outside the checkpoint folder")


def test_symlink_inside_the_folder_is_fine(make_checkpoint):
    path = make_checkpoint()
    (path / "blobs").mkdir()
    os.replace(path / "model.safetensors", path / "blobs" / "abc")
    (path / "model.safetensors").symlink_to("blobs/abc")
    assert Checkpoint.open(path).tensor("model.norm.weight").shape == (64,)


def test_hugging_face_cache_layout_is_accepted(make_checkpoint, llama_weights, tiny_config):
    # models--org--name/snapshots/<rev>/model.safetensors -> ../../blobs/<sha>, as huggingface_hub writes it
    src = make_checkpoint()
    repo = src.parent / "models--org--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        os.replace(f, repo / "blobs" / f"sha-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    ckpt = Checkpoint.open(snap)
    np.testing.assert_array_equal(ckpt.tensor("model.norm.weight"), llama_weights(tiny_config())["model.norm.weight"])
    assert ckpt.tokenizer().get_vocab_size() == 512


def test_index_may_spell_one_shard_two_ways(make_checkpoint):
    path = make_checkpoint(shards=2)
    _rewrite_index(path, lambda ix: ix["weight_map"].update({"model.norm.weight": "./" + ix["weight_map"]["model.norm.weight"]}))
    assert "model.norm.weight" in Checkpoint.open(path).names()


def test_index_shard_missing(make_checkpoint):
    path = make_checkpoint(shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    _refused(path, r"file 'model-00002-of-00002\.safetensors' does not exist")


def test_index_points_a_tensor_at_the_wrong_shard(make_checkpoint):
    path = make_checkpoint(shards=2)

    def move(ix):
        ix["weight_map"]["model.norm.weight"] = (
            "model-00001-of-00002.safetensors"
            if ix["weight_map"]["model.norm.weight"].startswith("model-00002")
            else "model-00002-of-00002.safetensors"
        )

    _rewrite_index(path, move)
    _refused(path, r"weight_map puts 'model\.norm\.weight' in model-0000\d-of-00002\.safetensors but that file does not hold it")


def test_index_without_weight_map(make_checkpoint):
    path = make_checkpoint(shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    _refused(path, "weight_map must be a non-empty object")


def test_tensor_stored_in_two_shards(make_checkpoint, tmp_path):
    from safetensors.numpy import save_file

    path = make_checkpoint(shards=2)
    dup = {"model.norm.weight": np.ones(64, np.float32)}
    save_file(dup, str(path / "model-00003-of-00003.safetensors"))
    _rewrite_index(path, lambda ix: ix["weight_map"].update({"extra.x": "model-00003-of-00003.safetensors"}))
    _refused(path, r"tensor 'model\.norm\.weight' is stored twice")


def test_several_missing_tensors_are_counted(make_checkpoint):
    msg = _refused(
        make_checkpoint(drop=["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]),
        r"'model\.layers\.0\.mlp\.up_proj\.weight' is missing \(and 1 more\)",
    )
    assert "does not match its config.json" in msg


def test_file_shrinking_after_open_is_an_error_not_a_crash(make_checkpoint):
    path = make_checkpoint()
    ckpt = Checkpoint.open(path)
    f = path / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 4096)
    with pytest.raises(CheckpointError, match="changed size since the checkpoint was opened"):
        ckpt.tensor("model.norm.weight")


def test_unknown_tensor_name_is_a_key_error(make_checkpoint):
    ckpt = Checkpoint.open(make_checkpoint())
    with pytest.raises(KeyError, match="nope"):
        ckpt.tensor("nope")
