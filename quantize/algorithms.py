"""How codes are chosen on a grid: the one list of algorithm names every command and the pipeline take.

Kept free of imports so the CLI can build its `--algo` choices without loading the quantizers.
"""

from __future__ import annotations

ALGORITHMS: tuple[str, ...] = ("rtn", "gptq", "awq", "awq+gptq")
CALIBRATED: frozenset[str] = frozenset(a for a in ALGORITHMS if a != "rtn")  # those that need --calib text

# What `--algo auto` (the commands' default) resolves to. With calibration text: AWQ then GPTQ, the most accurate
# at every 4-bit grid measured on the demo model (mean KL against the float model on text the calibration never
# saw: Q4_0 GGUF 0.073 vs GPTQ 0.102, Q4_K_M 0.016 vs 0.024 — bench/imatrix_bench.py; compressed-tensors W4A16
# g64 0.134 vs 0.181 — bench/gpu_formats_bench.py; ONNX int4 0.156 vs 0.204 — bench/onnx_bench.py) for ~1.5x
# GPTQ's time. Without it: RTN, which needs none (as llama-quantize does without an imatrix).
AUTO = "auto"


def resolve_algorithm(algo: str, *, calibrated: bool) -> str:
    """`algo`, or for "auto" the algorithm it stands for: awq+gptq when calibration text is given and the output
    quantizes (`calibrated`), rtn otherwise."""
    if algo != AUTO:
        return algo
    return "awq+gptq" if calibrated else "rtn"
