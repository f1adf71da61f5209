"""Cut a token stream into evaluation windows, and say exactly which tokens are scored.

Rule (the same for perplexity, KL divergence and top-1 agreement, for every runtime we compare):
the text is tokenized once, without a BOS token; the stream is cut into consecutive non-overlapping
windows of `ctx` tokens; a final window shorter than `ctx` is dropped. Each window is run on its own
(no context carried over), and every position but the last predicts the next token of the window, so a
window scores `ctx - 1` tokens: tokens 1..ctx-1 given the tokens before them in that window.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qkiln.errors import UserError


def read_text(path: str | Path) -> str:
    """The evaluation text; a clear error if it is missing or not UTF-8."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"text file {p} not found; pass an existing UTF-8 text file") from None
    except IsADirectoryError:
        raise UserError(f"{p} is a folder; pass a UTF-8 text file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def make_windows(ids: np.ndarray | list[int], ctx: int, *, max_windows: int | None = None) -> np.ndarray:
    """(n_windows, ctx) int64 windows of the token stream, per the module's rule."""
    if ctx < 2:
        raise UserError(f"--ctx must be at least 2, got {ctx}")
    stream = np.asarray(ids, dtype=np.int64)
    n = len(stream) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise UserError(
            f"the text has {len(stream)} tokens, fewer than one window of {ctx}; use a longer text or a smaller --ctx"
        )
    return stream[: n * ctx].reshape(n, ctx)
