"""Next-token metrics computed window by window, so a long text never holds all its logits in memory.

`TokenScores` accumulates, over the scored positions of each window (see validate/windows.py):
- negative log-likelihood of the true next token -> perplexity = exp(mean NLL);
- against a reference model's logits on the same tokens: KL(P_ref || P_model) per position (natural log),
  and top-1 agreement (argmax equal).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 for the reduction (logits (..., vocab) float32 in, float64 out)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


@dataclasses.dataclass
class TokenScores:
    n_tokens: int = 0
    nll_sum: float = 0.0
    kl_sum: float = 0.0
    kl_max: float = 0.0
    top1_agree: int = 0
    n_compared: int = 0

    def add_window(self, window: np.ndarray, logits: np.ndarray, ref_logits: np.ndarray | None = None) -> None:
        """Score one window: window (ctx,) ids; logits (ctx, vocab); ref_logits (ctx, vocab) or None.

        Positions 0..ctx-2 predict tokens 1..ctx-1; the last position's logits are not used.
        """
        targets = window[1:]
        logp = log_softmax(logits[:-1])  # (ctx-1, vocab)
        self.nll_sum += float(-logp[np.arange(len(targets)), targets].sum())
        self.n_tokens += len(targets)
        if ref_logits is not None:
            ref_logp = log_softmax(ref_logits[:-1])
            kl = (np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1)  # (ctx-1,)
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.top1_agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            self.n_compared += len(targets)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll_sum / self.n_tokens)

    @property
    def mean_kl(self) -> float | None:
        return self.kl_sum / self.n_compared if self.n_compared else None

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agree / self.n_compared if self.n_compared else None

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "scored_tokens": self.n_tokens,
            "perplexity": self.perplexity,
            "mean_kl": self.mean_kl,
            "max_kl": self.kl_max if self.n_compared else None,
            "top1_agreement": self.top1_agreement,
        }
