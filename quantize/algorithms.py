"""How codes are chosen on a grid: the one list of algorithm names every command and the pipeline take.

Kept free of imports so the CLI can build its `--algo` choices without loading the quantizers.
"""

from __future__ import annotations

ALGORITHMS: tuple[str, ...] = ("rtn", "gptq", "awq", "awq+gptq")
CALIBRATED: frozenset[str] = frozenset(a for a in ALGORITHMS if a != "rtn")  # those that need --calib text
