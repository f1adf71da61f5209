"""config.json parsing: every form transformers writes maps to one rope description; what qkiln cannot honour
is a CheckpointError naming the key. The rules are transformers 5.25's (modeling_rope_utils.py,
RotaryEmbeddingConfigMixin); tests marked torch check the mapping against transformers itself."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from qkiln.errors import CheckpointError
from qkiln.model.config import LlamaConfig, Rope, RopeScaling, parse_rope

BASE: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 320, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
L3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
L3_ROPE = Rope(500000.0, RopeScaling(8.0, 1.0, 4.0, 64))

# The same rope, written every way transformers writes (or has written) it.
EQUIVALENT_FORMS = {
    "v4_llama3_rope_type": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **L3}},
    "v4_llama3_type": {"rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **L3}},
    "v5_llama3": {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **L3}},
    "v5_llama3_legacy_type_kept": {"rope_parameters": {"rope_type": "llama3", "type": "llama3", "rope_theta": 500000.0, **L3}},
    "v5_and_v4_agreeing": {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **L3},
                           "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **L3}},
    "v5_theta_outside": {"rope_theta": 500000.0, "rope_parameters": {"rope_type": "llama3", **L3}},
    "v5_per_layer_type": {"layer_types": ["full_attention"] * 2,
                          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **L3,
                                              "full_attention": {"rope_type": "llama3", "rope_theta": 500000.0, **L3}}},
    "v5_orig_from_top_level": {"original_max_position_embeddings": 64,
                               "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                   **{k: v for k, v in L3.items() if k != "original_max_position_embeddings"}}},
}


def cfg(**extra: Any) -> dict[str, Any]:
    return {**BASE, **extra}


@pytest.mark.parametrize("form", list(EQUIVALENT_FORMS))
def test_every_form_reads_as_one_rope(form):
    c = LlamaConfig.from_dict(cfg(**EQUIVALENT_FORMS[form]))
    assert Rope(c.rope_theta, c.rope_scaling) == L3_ROPE


@pytest.mark.parametrize(
    ("extra", "rope"),
    [
        ({}, Rope(10000.0)),  # nothing: transformers' default_theta
        ({"rope_theta": 1000.0}, Rope(1000.0)),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, Rope(1000.0)),
        ({"rope_parameters": {"rope_theta": 1000.0}}, Rope(1000.0)),  # rope_type defaults to "default"
        ({"rope_parameters": None, "rope_scaling": None, "rope_theta": 1000.0}, Rope(1000.0)),
        ({"rope_scaling": {}, "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}}, Rope(1000.0)),
        ({"rope_scaling": {"type": "linear", "factor": 1.0}, "rope_theta": 1000.0}, Rope(1000.0)),  # x1 is plain
        ({"partial_rotary_factor": 1.0, "rope_theta": 1000.0}, Rope(1000.0)),
        # llama3 without original_max_position_embeddings: transformers takes max_position_embeddings
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0}}, Rope(1e4, RopeScaling(8.0, 1.0, 4.0, 512))),
    ],
)
def test_default_and_plain_forms(extra, rope):
    c = LlamaConfig.from_dict(cfg(**extra))
    assert Rope(c.rope_theta, c.rope_scaling) == rope


def test_absent_keys_take_transformers_defaults():
    c = LlamaConfig.from_dict({k: v for k, v in BASE.items() if k not in ("num_key_value_heads", "max_position_embeddings")})
    assert (c.rms_norm_eps, c.max_position_embeddings, c.num_key_value_heads, c.head_dim) == (1e-6, 2048, 4, 16)
    assert not c.tie_word_embeddings
    m = LlamaConfig.from_dict({k: v for k, v in BASE.items() if k not in ("architectures", "num_key_value_heads")}
                              | {"model_type": "mistral", "num_attention_heads": 8})
    assert m.architecture == "MistralForCausalLM" and m.num_key_value_heads == 8


def test_explicit_head_dim_and_swish():
    c = LlamaConfig.from_dict(cfg(head_dim=32, hidden_act="swish"))
    assert c.head_dim == 32


@pytest.mark.parametrize("rope", [Rope(1000.0), L3_ROPE])
def test_written_config_reads_back_and_carries_both_forms(rope):
    c = dataclasses.replace(LlamaConfig.from_dict(cfg()), rope_theta=rope.theta, rope_scaling=rope.scaling)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["rope_theta"] == rope.theta and d["rope_parameters"]["rope_theta"] == rope.theta
    assert ("rope_scaling" in d) == (rope.scaling is not None)
    assert LlamaConfig.from_dict(d) == c
    v4 = {k: v for k, v in d.items() if k != "rope_parameters"}  # what transformers 4.x reads
    v5 = {k: v for k, v in d.items() if k not in ("rope_scaling", "rope_theta")}  # what transformers 5.x reads
    assert _rope(v4) == _rope(v5) == rope


def _rope(d: dict[str, Any]) -> Rope:
    c = LlamaConfig.from_dict(d)
    return Rope(c.rope_theta, c.rope_scaling)


# (extra config keys, the key the one-line message must name)
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "linear": ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.type 'linear'"),
    "dynamic": ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type 'dynamic'"),
    "yarn": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                  "original_max_position_embeddings": 128}}, "rope_parameters.rope_type 'yarn'"),
    "longrope": ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                                      "original_max_position_embeddings": 128}}, "rope_parameters.rope_type 'longrope'"),
    "proportional": ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}},
                     "rope_parameters.rope_type 'proportional'"),
    "partial_rotary_top": ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    "partial_rotary_inside": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}},
                              "rope_parameters.partial_rotary_factor 0.25"),
    "attention_bias": ({"attention_bias": True}, "attention_bias is True"),
    "mlp_bias": ({"mlp_bias": True}, "mlp_bias is True"),
    "hidden_act": ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    "sliding_layer_type": ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types 'sliding_attention'"),
    "llama3_incomplete": ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    "llama3_low_ge_high": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **L3, "low_freq_factor": 4.0}},
                           "rope_parameters.low_freq_factor"),
    "unknown_rope_key": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **L3, "attention_factor": 2.0}},
                         "rope_parameters.attention_factor"),
    "factor_on_default": ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "factor": 4.0}},
                          "rope_parameters.factor"),
    "theta_disagrees": ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                        "rope_theta 10000.0 and rope_parameters.rope_theta 500000.0 disagree"),
    "forms_disagree": ({"rope_scaling": {"rope_type": "llama3", "rope_theta": 5e5, **L3},
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                       "rope_scaling .* and rope_parameters .* disagree"),
    "per_layer_disagrees": ({"layer_types": ["full_attention"] * 2,
                             "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 9.0}}},
                            "rope_parameters.full_attention asks for default rope \\(theta 9\\)"),
    "per_layer_null": ({"layer_types": ["full_attention"] * 2, "rope_parameters": {"full_attention": None}},
                       "rope_parameters.full_attention is None"),
    "type_keys_disagree": ({"rope_scaling": {"type": "linear", "rope_type": "llama3", **L3}},
                           "rope_scaling.type 'linear' and rope_scaling.rope_type 'llama3' disagree"),
    "orig_disagrees": ({"original_max_position_embeddings": 128,
                        "rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, **L3}},
                       "original_max_position_embeddings 128 and rope_parameters.original_max_position_embeddings 64"),
    "theta_not_number": ({"rope_parameters": {"rope_type": "default", "rope_theta": "big"}},
                         "rope_parameters.rope_theta is 'big'"),
    "odd_head_dim": ({"head_dim": 15}, "head_dim 15"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_with_the_key_named(case):
    extra, message = REFUSED[case]
    with pytest.raises(CheckpointError, match=f"^config.json: {message}") as ei:
        LlamaConfig.from_dict(cfg(**extra))
    assert "\n" not in str(ei.value)


def test_parse_rope_is_usable_alone():
    assert parse_rope({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **L3}}) == L3_ROPE


# -- against transformers itself -------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("form", [*EQUIVALENT_FORMS, "plain_v5", "plain_v4", "nothing"])
def test_forms_give_transformers_inv_freq(form):
    """The inverse frequencies transformers' LlamaRotaryEmbedding builds from the config equal qkiln's."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qkiln.runtime.rope import inv_frequencies

    extra = EQUIVALENT_FORMS.get(form) or {
        "plain_v5": {"rope_parameters": {"rope_type": "default", "rope_theta": 1000.0}},
        "plain_v4": {"rope_theta": 1000.0},
        "nothing": {},
    }[form]
    d = cfg(**json.loads(json.dumps(extra)))
    theirs = LlamaRotaryEmbedding(transformers.LlamaConfig.from_dict(json.loads(json.dumps(d)))).inv_freq
    c = LlamaConfig.from_dict(d)
    ours = inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    torch.testing.assert_close(torch.from_numpy(ours), theirs.float(), rtol=1e-6, atol=0)
