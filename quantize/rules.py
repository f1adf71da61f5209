"""Mixed precision by rule: which scheme each Hugging Face tensor gets.

A `RuleSet` is an ordered list of (pattern -> scheme name) rules plus a default; the first pattern
that matches a tensor's HF name wins. Patterns are shell globs (`*.mlp.down_proj.weight`) or, with
an `re:` prefix, regular expressions searched in the name (`re:layers\\.(0|1)\\.self_attn\\.v_proj`).
A rule's scheme may be "keep" to leave the tensor in floating point.

Fallback (qkiln refuses partial groups, so a rule picks another grid per tensor instead): when a
tensor's row length is not a multiple of the chosen scheme's block, `resolve` walks FALLBACK —
llama.cpp's table for its block types (`tensor_type_fallback` in llama-quant.cpp: Q4_K→Q5_0,
Q5_K→Q5_1, Q6_K→Q8_0, Q2_K/Q3_K→Q4_0; a 32-block type that still does not fit keeps the tensor in
float, as llama.cpp keeps F16), and for INT4 the next smaller group down to per-channel — and
reports why.

Presets reproduce llama.cpp's `llama_tensor_get_type` mixes for a Llama model (no experts, not
Falcon, not 70B): q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m
q6_k. E.g. "q4_k_m" = Q4_K, with Q6_K on attn_v and ffn_down in the layers where
`use_more_bits(i, n)` holds (the first and last eighth and every third layer in between) and Q6_K on
the output / tied embedding. Every preset was checked tensor by tensor against what llama.cpp 0.25
(llama-cpp-python 0.3.36) writes for the demo model (hidden 576, 30 layers, tied embeddings): e.g.
for q4_k_m, Q5_0 for q/k/o/gate/up and 16 attn_v, Q8_0 for 14 attn_v and token_embd, Q6_K for 14
ffn_down, Q4_K for 16 (tests/quantize/data/llamacpp_presets_smollm2.json).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from qkiln.errors import QuantizeError
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.scheme import Scheme

KEEP = "keep"

FALLBACK: dict[str, str] = {
    "q2_k": "q4_0",
    "q3_k": "q4_0",
    "q4_k": "q5_0",
    "q5_k": "q5_1",
    "q6_k": "q8_0",
    "int4_g128": "int4_g64",
    "int4_g64": "int4_g32",
    "int4_g32": "int4_pc",
    "int4_g128_asym": "int4_g64_asym",
    "int4_g64_asym": "int4_g32_asym",
    "int4_g32_asym": "int4_pc_asym",
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (glob, or `re:` + regex searched in the name) -> `scheme` (a registry name or "keep")."""

    pattern: str
    scheme: str

    def __post_init__(self) -> None:
        if self.scheme != KEEP:
            get_scheme(self.scheme)  # unknown name -> QuantizeError listing the valid ones
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise QuantizeError(f"rule {self.pattern!r}: bad regular expression ({e})") from None

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def parse_rule(text: str) -> Rule:
    """'PATTERN=SCHEME' (as a CLI `--rule` gives it) -> Rule."""
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern or not scheme:
        raise QuantizeError(f"rule {text!r} is not PATTERN=SCHEME, e.g. '*.mlp.down_proj.weight=q6_k'")
    return Rule(pattern.strip(), scheme.strip().lower())


def quantizable(name: str, shape: Sequence[int]) -> bool:
    """2-D `*.weight` tensors other than norms (llama.cpp's `tensor_allows_quantization`, for Llama)."""
    return len(shape) == 2 and name.endswith("weight") and "norm" not in name


@dataclasses.dataclass(frozen=True)
class RuleSet:
    """Ordered rules, first match wins; `default` for the rest. `fallback=False` makes a misfit an error."""

    rules: tuple[Rule, ...]
    default: str
    fallback: bool = True

    def __post_init__(self) -> None:
        if self.default != KEEP:
            get_scheme(self.default)

    def scheme_name(self, name: str) -> str:
        """The scheme name the rules choose for `name`, before any shape fallback."""
        for rule in self.rules:
            if rule.matches(name):
                return rule.scheme
        return self.default

    def resolve(self, name: str, shape: Sequence[int]) -> tuple[Scheme | None, str | None]:
        """(scheme, fallback_reason | None) for tensor `name` of `shape`; scheme None = keep in float."""
        if not quantizable(name, shape):
            return None, None
        wanted = self.scheme_name(name)
        if wanted == KEEP:
            return None, None
        scheme = get_scheme(wanted)
        cols = int(shape[1])
        if not self.fallback:
            scheme.check_shape(tuple(shape), name)
            return scheme, None
        chosen: Scheme | None = scheme
        while chosen is not None and chosen.fit_cols and cols % chosen.fit_cols:
            nxt = FALLBACK.get(chosen.name)
            chosen = get_scheme(nxt) if nxt else None
        if chosen is scheme:
            return scheme, None
        unit = scheme.fit_cols
        if chosen is None:
            return None, f"row length {cols} is not a multiple of {wanted}'s block of {unit}; kept in float"
        return (
            chosen,
            f"row length {cols} is not a multiple of {wanted}'s block of {unit}; using {chosen.name}",
        )

    def scheme_for(self, name: str, shape: tuple[int, ...]) -> Scheme:
        """The scheme for a tensor that must be quantized (the layer-streamed driver's protocol);
        QuantizeError when the rules or its shape keep it in float."""
        scheme, reason = self.resolve(name, shape)
        if scheme is None:
            why = reason or "the rules keep it in float"
            raise QuantizeError(f"{name}: no scheme — {why}; add a rule that gives it one")
        return scheme

    def plan(self, shapes: dict[str, Sequence[int]]) -> dict[str, tuple[str, str | None]]:
        """{name: (scheme name or "keep", fallback reason)} for a whole model, in the given order."""
        out: dict[str, tuple[str, str | None]] = {}
        for name, shape in shapes.items():
            scheme, reason = self.resolve(name, shape)
            out[name] = (scheme.name if scheme else KEEP, reason)
        return out


# --- llama.cpp presets -------------------------------------------------------------------------

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
V_PROJ = "self_attn.v_proj.weight"
DOWN_PROJ = "mlp.down_proj.weight"
O_PROJ = "self_attn.o_proj.weight"


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of layers that get more bits: first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _per_layer_rules(tensor: str, choose: Callable[[int], str | None], n_layers: int) -> list[Rule]:
    """One regex rule per scheme, listing the layers whose `tensor` `choose(i)` sends to it."""
    by_scheme: dict[str, list[int]] = {}
    for i in range(n_layers):
        scheme = choose(i)
        if scheme:
            by_scheme.setdefault(scheme, []).append(i)
    return [
        Rule(f"re:^model\\.layers\\.({'|'.join(map(str, layers))})\\.{re.escape(tensor)}$", scheme)
        for scheme, layers in by_scheme.items()
    ]


# llama.cpp ftype -> the default type of its tensors (llama_model_quantize_impl)
_DEFAULTS = {
    "q4_0": "q4_0",
    "q4_1": "q4_1",
    "q5_0": "q5_0",
    "q5_1": "q5_1",
    "q8_0": "q8_0",
    "q2_k": "q2_k",
    "q3_k_s": "q3_k",
    "q3_k_m": "q3_k",
    "q3_k_l": "q3_k",
    "q4_k_s": "q4_k",
    "q4_k_m": "q4_k",
    "q5_k_s": "q5_k",
    "q5_k_m": "q5_k",
    "q6_k": "q6_k",
}


def preset_names() -> list[str]:
    return list(_DEFAULTS)


def preset(name: str, n_layers: int, *, tied_embeddings: bool = True, n_gqa: int = 1) -> RuleSet:
    """llama.cpp's mix `name` ("q4_k_m", ...) for a Llama model (no experts, not Falcon, not 70B) with
    `n_layers` decoder layers and `n_gqa` = attention heads / KV heads — `llama_tensor_get_type`'s
    choices for attn_v, attn_output and ffn_down, and Q6_K (Q8_0 for q8_0) for the output."""
    ftype = name.strip().lower()
    if ftype not in _DEFAULTS:
        raise QuantizeError(f"unknown preset {name!r}; valid presets: {', '.join(_DEFAULTS)}")
    default = _DEFAULTS[ftype]
    output = "q8_0" if default == "q8_0" else "q6_k"
    n = n_layers

    def attn_v(i: int) -> str | None:
        if ftype == "q2_k":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if ftype == "q4_k_s" and i < 4:
            return "q5_k"
        return None

    def ffn_down(i: int) -> str | None:
        if ftype == "q2_k":
            return "q3_k"
        if ftype == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if ftype == "q3_k_l":
            return "q5_k"
        if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i, n):
            return "q6_k"
        if ftype == "q4_k_s" and i < n // 8:
            return "q5_k"
        return None

    attn_output = {"q2_k": "q3_k", "q3_k_m": "q4_k", "q3_k_l": "q5_k"}.get(ftype)

    rules = [Rule(LM_HEAD, output)]
    # llama.cpp quantizes a tied token embedding as the output tensor; an untied one gets the default.
    rules.append(Rule(EMBED, output if tied_embeddings else default))
    rules += _per_layer_rules(V_PROJ, attn_v, n)
    rules += _per_layer_rules(DOWN_PROJ, ffn_down, n)
    if attn_output:
        rules.append(Rule(f"*.{O_PROJ}", attn_output))
    return RuleSet(tuple(rules), default)


def single(scheme: str) -> RuleSet:
    """Every quantizable tensor on one scheme, with the fallback table for misfits."""
    return RuleSet((), scheme)


def summarize_fallbacks(reasons: Iterable[str]) -> list[str]:
    """One line per distinct fallback reason with how many tensors took it, most frequent first.

    A model's fallbacks repeat one rule per layer (the demo model: 181 tensors whose 576-wide rows do not
    fit a 256 block); the per-tensor list is for --verbose and --json, this is what a person reads.
    """
    counts = Counter(reasons)
    return [f"{n} tensor{'s' if n != 1 else ''}: {why}" for why, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
