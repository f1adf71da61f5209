from __future__ import annotations

import math

import numpy as np
import pytest

from qkiln.errors import UserError
from qkiln.validate.evaluate import evaluate
from qkiln.validate.metrics import TokenScores, log_softmax
from qkiln.validate.windows import make_windows


def test_windows_drop_the_partial_tail_and_refuse_short_text():
    w = make_windows(list(range(10)), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert make_windows(list(range(10)), 4, max_windows=1).shape == (1, 4)
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows([1, 2, 3], 4)


def test_perplexity_of_a_uniform_model_is_the_vocab_size():
    vocab = 37
    scores = TokenScores()
    window = np.array([3, 5, 7, 11])
    scores.add_window(window, np.zeros((4, vocab), np.float32))
    assert scores.n_tokens == 3
    assert math.isclose(scores.perplexity, vocab, rel_tol=1e-12)


def test_kl_and_top1_match_a_direct_computation():
    rng = np.random.default_rng(0)
    ctx, vocab = 6, 50
    window = rng.integers(0, vocab, ctx)
    a = rng.normal(size=(ctx, vocab)).astype(np.float32)
    b = (a + 0.3 * rng.normal(size=(ctx, vocab))).astype(np.float32)
    scores = TokenScores()
    scores.add_window(window, b, ref_logits=a)
    pa = np.exp(a[:-1].astype(np.float64))
    pa /= pa.sum(-1, keepdims=True)
    pb = np.exp(b[:-1].astype(np.float64))
    pb /= pb.sum(-1, keepdims=True)
    kl = (pa * np.log(pa / pb)).sum(-1)
    assert math.isclose(scores.mean_kl, kl.mean(), rel_tol=1e-9)
    assert scores.top1_agreement == (a[:-1].argmax(-1) == b[:-1].argmax(-1)).mean()
    # identical models: zero KL, full agreement
    same = TokenScores()
    same.add_window(window, a, ref_logits=a)
    assert abs(same.mean_kl) < 1e-12 and same.top1_agreement == 1.0


def test_log_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 0.0, -1e4]], np.float32)
    out = log_softmax(x)
    assert np.isfinite(out).all() and math.isclose(out[0, 0], 0.0, abs_tol=1e-12)


def test_evaluate_scores_each_window_and_times_only_the_model():
    vocab = 8
    windows = make_windows(np.arange(40) % vocab, 5)

    def perfect(ids):  # puts all mass on the next id (ids cycle mod vocab)
        nxt = (ids + 1) % vocab
        out = np.full((*ids.shape, vocab), -30.0, np.float32)
        np.put_along_axis(out, nxt[..., None], 30.0, axis=-1)
        return out

    res = evaluate(perfect, windows, reference=perfect)
    assert res.windows == 8 and res.scores.n_tokens == 8 * 4
    assert res.scores.perplexity < 1.0001
    assert res.scores.top1_agreement == 1.0
