"""Recipes: one TOML file per hardware target (recipes/*.toml), loaded into frozen dataclasses.

A recipe names the target's facts (CPU model and ISA features for QEMU, memory bandwidth, instance and
price), the artifacts to build (format, scheme or llama.cpp mix, algorithm, per-tensor rules),
calibration and evaluation settings and acceptance thresholds. Loading is strict, as llm-compressor's
recipe models are: an unknown key, a wrong type, a value out of range, an unknown CPU feature or a missing
text file is a `RecipeError` (exit 2) that names the file, the key and its line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qkiln.errors import QuantizeError, UserError
from qkiln.quantize.registry import get_scheme
from qkiln.quantize.rules import parse_rule, preset_names
from qkiln.validate.gates import THRESHOLDS, Thresholds

SCHEMA_VERSION = 1
FORMATS = ("gguf", "onnx", "compressed-tensors", "gptq")
ALGORITHMS = ("rtn", "gptq", "awq", "awq+gptq")
KINDS = ("cpu", "gpu")
ARCHES = ("aarch64", "x86_64", "cuda", "rocm")
# Features a recipe may list, per architecture (names as Linux /proc/cpuinfo or the vendor spells them).
ISA_FEATURES: dict[str, frozenset[str]] = {
    "aarch64": frozenset({"neon", "fp16", "dotprod", "i8mm", "bf16", "sve", "sve2", "sme"}),
    "x86_64": frozenset({"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni", "avx512f", "avx512bw",
                         "avx512vl", "avx512dq", "avx512vnni", "avx512bf16", "avx512vbmi", "avx512fp16",
                         "amx_tile", "amx_int8", "amx_bf16"}),
    "cuda": frozenset({"fp16", "bf16", "int8", "int4", "fp8_e4m3fn", "fp8_e5m2", "sm_80", "sm_89", "sm_90"}),
    "rocm": frozenset({"fp16", "bf16", "int8", "int4", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "gfx942"}),
}
# qemu-aarch64 7.2's CPU models (`qemu-aarch64 -cpu help`); options after a comma are passed through.
QEMU_CPUS = ("a64fx", "cortex-a35", "cortex-a53", "cortex-a57", "cortex-a72", "cortex-a76", "max", "neoverse-n1")


class RecipeError(UserError):
    """A recipe file is malformed; the message names the file, the key and its line."""


# -- the recipe model --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    kind: str  # KINDS
    arch: str  # ARCHES
    cpu: str  # the CPU or GPU model, e.g. "Neoverse V2"
    isa: tuple[str, ...]  # ISA_FEATURES[arch]
    memory_bandwidth_gbs: float  # peak DRAM (or HBM) bandwidth of the instance, GB/s
    instance: str  # e.g. "c8g.large"
    price_per_hour: float  # USD, on-demand, the region named in the recipe's comment
    qemu_cpu: str | None = None  # qemu-aarch64 -cpu model for the ISA check (Arm targets)
    vcpus: int | None = None


@dataclasses.dataclass(frozen=True)
class Artifact:
    name: str
    format: str  # FORMATS
    scheme: str  # a scheme of quantize.registry or a llama.cpp mix (quantize.rules presets)
    algo: str = "rtn"
    uniform: bool = False  # one scheme for every tensor instead of llama.cpp's mix for that name
    rules: tuple[str, ...] = ()  # "PATTERN=SCHEME" (quantize.rules.parse_rule), first match wins
    thresholds: Thresholds | None = None  # overrides of the recipe's thresholds for this artifact


@dataclasses.dataclass(frozen=True)
class Calibration:
    text: tuple[Path, ...]
    samples: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class Evaluation:
    text: tuple[Path, ...]
    ctx: int
    max_windows: int
    isa_windows: int  # windows run under qemu for the target-ISA check
    isa_ctx: int  # their length in tokens (qemu runs the kernels ~20-50x slower than the host)
    real_runtime_windows: int  # windows also scored through the artifact's real runtime (llama.cpp), a cross-check


@dataclasses.dataclass(frozen=True)
class Recipe:
    path: Path
    sha256: str  # of the file's bytes
    seed: int
    target: Target
    calibration: Calibration
    evaluation: Evaluation
    thresholds: Thresholds
    artifacts: tuple[Artifact, ...]

    def thresholds_for(self, artifact: Artifact) -> Thresholds:
        return self.thresholds.merged(artifact.thresholds)


# -- locating keys in the text (tomllib gives no positions) ------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"]+)\s*=")


def _line_of(text: str, where: tuple[str | int, ...]) -> int | None:
    """1-based line of the key at `where` (("artifacts", 0, "scheme"), ("target", "isa")), else of the
    deepest table header enclosing it; None when neither is found."""
    counts: dict[str, int] = {}
    table: tuple[str | int, ...] = ()
    best: tuple[int, int] | None = None  # (depth, line)
    for i, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            dotted: list[str | int] = list(m.group(2).replace('"', "").split("."))
            head = str(dotted[0])
            if m.group(1) == "[[":
                counts[head] = counts.get(head, -1) + 1
                dotted.append(counts[head])
            elif head in counts:  # a sub-table of the last array element: [artifacts.thresholds]
                dotted.insert(1, counts[head])
            table = tuple(dotted)
            if where[: len(table)] == table and (best is None or len(table) > best[0]):
                best = (len(table), i)
            continue
        m = _KEY.match(line)
        if m and (*table, m.group(1).strip('"')) == where:
            return i
        if m and len(where) > len(table) + 1 and (*table, m.group(1).strip('"')) == where[: len(table) + 1]:
            best = (len(table) + 1, i)  # inside an inline table or array on this line
    return best[1] if best else None


class _Reader:
    """Typed access to a parsed TOML table that records the keys it read and names file/key/line on error."""

    def __init__(self, path: Path, text: str, data: dict[str, Any], where: tuple[str | int, ...] = ()):
        self.path, self.text, self.data, self.where = path, text, data, where
        self.read: set[str] = set()

    def error(self, key: str | None, msg: str) -> RecipeError:
        where = (*self.where, key) if key is not None else self.where
        line = _line_of(self.text, where)
        dotted = ".".join(f"[{p}]" if isinstance(p, int) else p for p in where).replace(".[", "[")
        at = f", line {line}" if line else ""
        return RecipeError(f"{self.path}: key {dotted or '(top level)'}{at}: {msg}")

    def child(self, key: str, index: int | None = None) -> _Reader:
        value = self.data[key] if index is None else self.data[key][index]
        where = (*self.where, key) if index is None else (*self.where, key, index)
        return _Reader(self.path, self.text, value, where)

    def get(self, key: str, kind: type | tuple[type, ...], *, required: bool = True, default: Any = None,
            check: Callable[[Any], str | None] | None = None) -> Any:
        self.read.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "is required")
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML has int and float; accept an int where a float is asked, never a bool for a number
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            raise self.error(key, f"expected {names}, got {_TYPE_NAMES.get(type(value), type(value).__name__)} {value!r}")
        if check is not None:
            problem = check(value)
            if problem:
                raise self.error(key, problem)
        return value

    def table(self, key: str, *, required: bool = True) -> _Reader | None:
        if key not in self.data and not required:
            self.read.add(key)
            return None
        self.get(key, dict)
        return self.child(key)

    def finish(self) -> None:
        """Refuse keys nobody read: a typo must not be silently ignored."""
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise self.error(unknown[0], f"unknown key; expected one of {', '.join(sorted(self.read))}")


_TYPE_NAMES: dict[type, str] = {str: "a string", int: "an integer", float: "a number", bool: "true/false",
                                list: "an array", dict: "a table"}


def _in(choices: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{v!r} is not one of {', '.join(choices)}"


def _between(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"{v} is out of range ({lo} to {hi})"


def _strings(v: list[Any]) -> str | None:
    bad = [x for x in v if not isinstance(x, str)]
    return f"expected an array of strings, got {bad[0]!r}" if bad else None


# -- the loader ---------------------------------------------------------------------------------------


def _thresholds(r: _Reader) -> Thresholds:
    values = {}
    for field, (_, _, _label, (lo, hi)) in THRESHOLDS.items():
        values[field] = r.get(field, float, required=False, check=_between(lo, hi))
    r.finish()
    return Thresholds(**values)


def _texts(r: _Reader, key: str, base: Path) -> tuple[Path, ...]:
    names = r.get(key, list, check=lambda v: _strings(v) or (None if v else "needs at least one file"))
    out = []
    for name in names:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else (base / p)
        if not p.is_file():
            raise r.error(key, f"text file {name} not found (relative paths are relative to the recipe)")
        out.append(p)
    return tuple(out)


def _target(r: _Reader) -> Target:
    arch = r.get("arch", str, check=_in(ARCHES))
    features = ISA_FEATURES[arch]

    def isa_ok(v: list[Any]) -> str | None:
        bad = _strings(v)
        if bad:
            return bad
        unknown = [f for f in v if f not in features]
        return f"unknown CPU feature {unknown[0]!r} for {arch}; known: {', '.join(sorted(features))}" if unknown else None

    def qemu_ok(v: str) -> str | None:
        if arch != "aarch64":
            return f"qemu_cpu applies to aarch64 targets only (this target is {arch})"
        model = v.split(",", 1)[0]
        return None if model in QEMU_CPUS else f"unknown qemu-aarch64 CPU model {model!r}; known: {', '.join(QEMU_CPUS)}"

    t = Target(
        name=r.get("name", str, check=lambda v: None if re.fullmatch(r"[a-z0-9][a-z0-9_.\-]*", v) else
                   "use lower-case letters, digits, '-', '_' and '.'"),
        description=r.get("description", str),
        kind=r.get("kind", str, check=_in(KINDS)),
        arch=arch,
        cpu=r.get("cpu", str),
        isa=tuple(r.get("isa", list, check=isa_ok)),
        memory_bandwidth_gbs=r.get("memory_bandwidth_gbs", float, check=_between(0.1, 100_000)),
        instance=r.get("instance", str),
        price_per_hour=r.get("price_per_hour", float, check=_between(0.0, 10_000)),
        qemu_cpu=r.get("qemu_cpu", str, required=False, check=qemu_ok),
        vcpus=r.get("vcpus", int, required=False, check=_between(1, 100_000)),
    )
    r.finish()
    return t


def _scheme_ok(v: str) -> str | None:
    if v.lower() in preset_names():
        return None
    try:
        get_scheme(v)
    except QuantizeError:
        return f"unknown scheme {v!r}; see `qkiln schemes` (a weight grid or a llama.cpp mix such as q4_k_m)"
    return None


def _rules_ok(v: list[Any]) -> str | None:
    bad = _strings(v)
    if bad:
        return bad
    for text in v:
        try:
            parse_rule(text)
        except QuantizeError as e:
            return f"rule {text!r}: {e}"
    return None


def _artifact(r: _Reader) -> Artifact:
    overrides = r.table("thresholds", required=False)
    a = Artifact(
        name=r.get("name", str, check=lambda v: None if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", v) else
                   "use letters, digits, '-', '_' and '.' (it names the artifact's file)"),
        format=r.get("format", str, check=_in(FORMATS)),
        scheme=r.get("scheme", str, check=_scheme_ok).lower(),
        algo=r.get("algo", str, required=False, default="rtn", check=_in(ALGORITHMS)),
        uniform=r.get("uniform", bool, required=False, default=False),
        rules=tuple(r.get("rules", list, required=False, default=[], check=_rules_ok)),
        thresholds=_thresholds(overrides) if overrides is not None else None,
    )
    r.finish()
    return a


def load_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe; RecipeError (exit 2) names the file, key and line of the first problem."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"recipe {p} not found; pass a file such as recipes/graviton4.toml") from None
    except IsADirectoryError:
        raise RecipeError(f"{p} is a folder; pass a recipe file such as recipes/graviton4.toml") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: not valid TOML: {e}") from None
    top = _Reader(p, text, data)
    top.get("schema", int, check=lambda v: None if v == SCHEMA_VERSION else
            f"this qkiln reads recipe schema {SCHEMA_VERSION}, the file says {v}")
    seed = top.get("seed", int, required=False, default=0, check=_between(0, 2**32 - 1))
    base = p.resolve().parent
    target_r = top.table("target")
    calib_r = top.table("calibration")
    eval_r = top.table("evaluation")
    thr_r = top.table("thresholds")
    assert target_r and calib_r and eval_r and thr_r
    target = _target(target_r)
    calibration = Calibration(
        text=_texts(calib_r, "text", base),
        samples=calib_r.get("samples", int, check=_between(1, 100_000)),
        seq_len=calib_r.get("seq_len", int, check=_between(16, 1_000_000)),
    )
    calib_r.finish()
    evaluation = Evaluation(
        text=_texts(eval_r, "text", base),
        ctx=eval_r.get("ctx", int, check=_between(16, 1_000_000)),
        max_windows=eval_r.get("max_windows", int, check=_between(1, 100_000)),
        isa_windows=eval_r.get("isa_windows", int, required=False, default=1, check=_between(0, 1000)),
        isa_ctx=eval_r.get("isa_ctx", int, required=False, default=32, check=_between(2, 100_000)),
        real_runtime_windows=eval_r.get("real_runtime_windows", int, required=False, default=1,
                                        check=_between(0, 100_000)),
    )
    eval_r.finish()
    overlap = {t.resolve() for t in calibration.text} & {t.resolve() for t in evaluation.text}
    if overlap:
        raise eval_r.error("text", f"{sorted(map(str, overlap))[0]} is also a calibration text; keep them disjoint "
                                   "(an artifact calibrated on its evaluation text flatters itself)")
    thresholds = _thresholds(thr_r)
    items = top.get("artifacts", list, check=lambda v: None if v else "needs at least one [[artifacts]] table")
    artifacts = []
    for i in range(len(items)):
        if not isinstance(items[i], dict):
            raise top.error("artifacts", "expected [[artifacts]] tables")
        artifacts.append(_artifact(top.child("artifacts", i)))
    names = [a.name for a in artifacts]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise top.child("artifacts", names.index(dup)).error("name", f"artifact name {dup!r} is used twice")
    top.finish()
    return Recipe(path=p, sha256=hashlib.sha256(raw).hexdigest(), seed=seed, target=target,
                  calibration=calibration, evaluation=evaluation, thresholds=thresholds, artifacts=tuple(artifacts))
