"""Run a model (and optionally a reference) over evaluation windows and score it.

Models are plain callables `ids (b, ctx) int64 -> logits (b, ctx, vocab) float32`, so qkiln's runtime,
transformers and llama.cpp are scored by the same code on the same tokens.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np

from qkiln.validate.metrics import TokenScores

LogitsFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass
class EvalResult:
    scores: TokenScores
    windows: int
    ctx: int
    seconds: float  # wall time of the evaluated model's forward passes only (the reference is not counted)

    @property
    def tokens_per_second(self) -> float:
        return self.windows * self.ctx / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            **self.scores.as_dict(),
            "windows": self.windows,
            "ctx": self.ctx,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
        }


def evaluate(
    model: LogitsFn,
    windows: np.ndarray,
    *,
    reference: LogitsFn | None = None,
    on_window: Callable[[int], None] | None = None,
) -> EvalResult:
    """Score `model` on windows (n, ctx); with `reference`, also KL divergence and top-1 agreement.

    One window at a time: memory holds one window's logits per model, whatever the text length.
    """
    scores = TokenScores()
    seconds = 0.0
    for i, window in enumerate(windows):
        t0 = time.perf_counter()
        logits = model(window[None, :])[0]  # (ctx, vocab)
        seconds += time.perf_counter() - t0
        ref_logits = reference(window[None, :])[0] if reference is not None else None
        scores.add_window(window, logits, ref_logits)
        if on_window is not None:
            on_window(i)
    return EvalResult(scores=scores, windows=len(windows), ctx=windows.shape[1], seconds=seconds)
