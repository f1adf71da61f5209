"""`pipeline.stream.CodeStore`: a recording replays the same tensors; an unfinished one is never replayed."""

from __future__ import annotations

import numpy as np

from qkiln.formats.hf import Checkpoint
from qkiln.pipeline.stream import CodeStore, RecordingStream, StoredStream, tensor_schemes, weight_stream
from qkiln.quantize.tensor import QuantizedTensor


def same(a, b) -> bool:
    if isinstance(a, QuantizedTensor):
        return (isinstance(b, QuantizedTensor) and a.scheme.name == b.scheme.name and a.name == b.name
                and np.array_equal(a.codes, b.codes) and a.params.keys() == b.params.keys()
                and all(np.array_equal(a.params[k], b.params[k]) for k in a.params))
    return not isinstance(b, QuantizedTensor) and a.dtype == b.dtype and np.array_equal(a, b)


def test_a_complete_recording_replays_the_same_tensors_and_a_partial_one_is_not_used(make_checkpoint, tmp_path):
    ckpt = Checkpoint.open(make_checkpoint())
    shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
    schemes, _ = tensor_schemes(ckpt.config, shapes, "int4_g32_asym", uniform=True)
    first = weight_stream(ckpt, schemes, "rtn", [], store=CodeStore(tmp_path, label="a"))
    assert isinstance(first, RecordingStream)
    half = first.names[: len(first.names) // 2]
    for n in half:
        first.get(n)
    # not read to the end (a writer that failed): the next stream quantizes again and records anew
    again = weight_stream(ckpt, schemes, "rtn", [], store=CodeStore(tmp_path, label="b"))
    assert isinstance(again, RecordingStream)
    made = dict(iter(again))
    store = CodeStore(tmp_path, label="c")
    replay = weight_stream(ckpt, schemes, "rtn", [], store=store)
    assert isinstance(replay, StoredStream) and store.reused_from == "b"
    assert sorted(replay.names) == sorted(made)
    for n in reversed(replay.names):  # any order
        assert same(made[n], replay.get(n)), n
    # another grid is another key
    other, _ = tensor_schemes(ckpt.config, shapes, "int4_g64", uniform=True)
    assert isinstance(weight_stream(ckpt, other, "rtn", [], store=CodeStore(tmp_path)), RecordingStream)
