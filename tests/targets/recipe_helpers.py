"""Recipes for tests: a tiny model's recipe as TOML text, with every path inside tmp_path."""

from __future__ import annotations

from pathlib import Path

# Lines of English-ish text the tiny tokenizer (tests/conftest.py) was trained on, in two disjoint halves.
WORDS = ("the model layer weight tensor kernel cache memory speed accuracy quantize token scale group block "
         "of and to a in is that for it as with was on be by this are from or at an not have which").split()


def write_texts(folder: Path) -> tuple[Path, Path]:
    """(calibration text, evaluation text): different seeded word streams of about 6,000 words each."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, seed in (("calib.txt", 1), ("eval.txt", 2)):
        rng = np.random.default_rng(seed)
        words = rng.choice(WORDS, size=6000)
        lines = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
        (folder / name).write_text("\n".join(lines) + "\n")
        out.append(folder / name)
    return out[0], out[1]


def tiny_recipe(folder: Path, *, arch: str = "x86_64", qemu_cpu: str | None = None, thresholds: str = "",
                artifacts: str | None = None, extra_target: str = "") -> Path:
    """A recipe for the tiny random model: loose thresholds (random weights), short windows."""
    calib, ev = write_texts(folder / "texts")
    isa = '["neon", "dotprod"]' if arch == "aarch64" else '["avx2"]'
    qemu = f'qemu_cpu = "{qemu_cpu}"\n' if qemu_cpu else ""
    arts = artifacts if artifacts is not None else '''
[[artifacts]]
name = "q8_0"
format = "gguf"
scheme = "q8_0"

[[artifacts]]
name = "q4_0"
format = "gguf"
scheme = "q4_0"
algo = "rtn"
uniform = true
'''
    text = f'''# a tiny test recipe
schema = 1

[target]
name = "tiny"
description = "a test target"
kind = "cpu"
arch = "{arch}"
cpu = "test cpu"
isa = {isa}
{qemu}memory_bandwidth_gbs = 100.0
instance = "test.large"
price_per_hour = 0.1
{extra_target}
[calibration]
text = ["{calib}"]
samples = 4
seq_len = 32

[evaluation]
text = ["{ev}"]
ctx = 32
max_windows = 3
isa_windows = 1
isa_ctx = 16

[thresholds]
max_mean_kl = 5.0
max_ppl_increase_pct = 500.0
min_top1 = 0.0
{thresholds}
{arts}'''
    path = folder / "tiny.toml"
    path.write_text(text)
    return path
