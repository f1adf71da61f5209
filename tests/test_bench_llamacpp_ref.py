"""bench/llamacpp_ref.py turns /proc/cpuinfo into the ggml cmake options of the CPU at hand (no build here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("_llamacpp_ref", ROOT / "bench" / "llamacpp_ref.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_llamacpp_ref"] = mod
    spec.loader.exec_module(mod)
    return mod


ref = _load()

BASE = "fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt"
AVX2 = BASE + " avx avx2 fma f16c bmi2"
ZEN4 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni"
SAPPHIRE = ZEN4 + " avx_vnni amx_bf16 amx_tile amx_int8"


def cpuinfo(flags: str) -> str:
    """Two processors, as /proc/cpuinfo lists them; only the first one's flags count."""
    return f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {BASE}\n"


def on(flags: str) -> set[str]:
    return set(ref.enabled(ref.ggml_options(ref.cpu_flags(cpuinfo(flags)))))


def test_avx2_cpu_gets_avx2_and_no_avx512():
    opts = ref.ggml_options(ref.cpu_flags(cpuinfo(AVX2)))
    assert opts[0] == "-DGGML_NATIVE=OFF"
    assert on(AVX2) == {f"-DGGML_{x}=ON" for x in ("SSE42", "AVX", "AVX2", "FMA", "F16C", "BMI2")}
    assert "-DGGML_AVX512=OFF" in opts


def test_avx512_cpu_gets_its_extensions():
    assert on(ZEN4) - on(AVX2) == {f"-DGGML_{x}=ON" for x in ("AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16")}


def test_amx_is_never_turned_on_and_avx_vnni_follows_the_cpu():
    opts = ref.ggml_options(ref.cpu_flags(cpuinfo(SAPPHIRE)))
    assert on(SAPPHIRE) - on(ZEN4) == {"-DGGML_AVX_VNNI=ON"}
    assert {"-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"} <= set(opts)
    assert "-DGGML_NATIVE=ON" not in opts


def test_an_older_cpu_gets_explicit_offs():
    # ggml turns AVX/AVX2/FMA/F16C/BMI2 on by default when GGML_NATIVE=OFF; an SSE-only CPU must say OFF.
    opts = ref.ggml_options(ref.cpu_flags(cpuinfo(BASE)))
    assert on(BASE) == {"-DGGML_SSE42=ON"}
    assert {"-DGGML_AVX=OFF", "-DGGML_AVX2=OFF", "-DGGML_FMA=OFF", "-DGGML_F16C=OFF", "-DGGML_BMI2=OFF"} <= set(opts)


def test_avx512_needs_all_five_foundation_flags():
    assert "-DGGML_AVX512=ON" not in on(AVX2 + " avx512f avx512vl")


def test_cache_key_changes_with_the_flag_set_only():
    a = ref.ggml_options(ref.cpu_flags(cpuinfo(ZEN4)))
    b = ref.ggml_options(ref.cpu_flags(cpuinfo(SAPPHIRE)))
    assert ref.build_key("0.3.36", a) == ref.build_key("0.3.36", list(reversed(a)))
    assert ref.build_key("0.3.36", a) != ref.build_key("0.3.36", b)
    assert ref.build_key("0.3.36", a) != ref.build_key("0.3.37", a)


def test_this_machines_pin_is_read():
    assert ref.pinned_version().count(".") == 2
