"""validate_artifact's speed entry for a GGUF: timed on the file's own types, and "not measured" (with the reason,
the speed floor not gated) when a weight type has no kernel — never another type's figure."""

from __future__ import annotations

import numpy as np
import pytest

from qkiln.formats.gguf_model import load_gguf_model
from qkiln.validate.artifact import ReferenceLogits, validate_artifact
from qkiln.validate.gates import Thresholds

TYPES = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q4_1", "ffn_gate": "Q5_1",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q5_0"}


@pytest.mark.parametrize("ffn_up", ["Q4_K", "F16"])
def test_speed_is_measured_on_kernels_or_not_at_all(make_gguf, tmp_path, ffn_up):
    path = make_gguf(types={**TYPES, "ffn_up": ffn_up}, hidden=256, intermediate=512)
    model = load_gguf_model(path).model
    windows = np.arange(3, 3 + 2 * 16, dtype=np.int64).reshape(2, 16)  # (2 windows, 16 tokens)
    ref = ReferenceLogits(model.forward, windows, tmp_path)
    result, checks = validate_artifact(path, ref, Thresholds(min_decode_tokens_per_s=1e-3), speed_seconds=0.0,
                                       real_runtime=False)
    speed = result["speed"]
    gated = {c.threshold for c in checks}
    if ffn_up == "Q4_K":
        assert speed["decode_tokens_per_s"] > 0 and "Q5_0" in speed["types"] and "Q5_1" in speed["types"]
        assert "min_decode_tokens_per_s" in gated
    else:
        assert speed["measured"] is False and "no kernel for F16" in speed["reason"]
        assert "min_decode_tokens_per_s" not in gated
