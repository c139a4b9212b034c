"""Perplexity windows and the KL / top-1 accumulation of kiln.runtime.evaluate, against direct
numpy computations (no TVM: the models here are numpy functions)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax as scipy_log_softmax

from kiln.compiler.errors import KilnError
from kiln.runtime.evaluate import evaluate, log_softmax, windows
from tests.helpers import assert_close

VOCAB = 50


def bigram(seed: int, scale: float = 3.0):
    """A model whose logits at a position depend on the token there and on its position in the
    window (so that windowing mistakes change the result)."""
    table = np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)) * scale

    def logits(ids: np.ndarray) -> np.ndarray:
        pos = np.arange(ids.shape[1])[None, :, None] * 0.01
        return (table[ids] + pos).astype(np.float32)

    return logits


def hf_loop(model, ids: np.ndarray, context: int, stride: int):
    """Hugging Face's perplexity guide, transcribed: labels -100 outside the new tokens."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg = end - prev_end
        window = ids[begin:end]
        labels = window.copy()
        labels[:-trg] = -100
        logp = scipy_log_softmax(model(window[None])[0].astype(np.float64), axis=-1)
        for j in range(1, len(window)):  # the model's shift: position j - 1 predicts j
            if labels[j] != -100:
                nll -= logp[j - 1, labels[j]]
                count += 1
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize(("n", "context", "stride"),
                         [(100, 16, 8), (100, 16, 16), (100, 16, 5), (10, 16, 8), (17, 16, 1),
                          (2, 4, 2)])
def test_perplexity_matches_the_hugging_face_loop(n, context, stride, rng):
    ids = rng.integers(0, VOCAB, n)
    model = bigram(0)
    nll, count = hf_loop(model, ids, context, stride)
    r = evaluate(model, ids, context=context, stride=stride)
    assert r.tokens == count
    assert_close(r.nll, nll, rtol=1e-12, atol=1e-9, name="nll")
    assert math.isclose(r.perplexity, math.exp(nll / count), rel_tol=1e-12)


def test_windows_score_every_token_once_when_they_overlap():
    for n, context, stride in [(1000, 64, 32), (65, 64, 63), (64, 64, 1), (3, 64, 32)]:
        scored = [t for w in windows(n, context, stride) for t in range(w.scored, w.end)]
        assert scored == list(range(1, n))
        for w in windows(n, context, stride):
            assert w.end - w.begin <= context and w.begin < w.scored


def test_log_softmax_is_float64_and_stable(rng):
    x = (rng.standard_normal((3, 7)) * 1e3).astype(np.float32)
    got = log_softmax(x)
    assert got.dtype == np.float64
    assert_close(got, scipy_log_softmax(x.astype(np.float64), axis=-1), name="log_softmax")


def test_kl_and_top1_against_numpy(rng):
    ids = rng.integers(0, VOCAB, 40)
    model, ref = bigram(0), bigram(1)
    r = evaluate(model, ids, context=64, stride=32, reference=ref)
    p = scipy_log_softmax(ref(ids[None])[0, :-1].astype(np.float64), axis=-1)
    q = scipy_log_softmax(model(ids[None])[0, :-1].astype(np.float64), axis=-1)
    kl = (np.exp(p) * (p - q)).sum(-1)
    assert r.tokens == 39
    assert_close(r.kl_divergence, kl.mean(), rtol=1e-10, name="kl")
    assert r.top1_agreement == pytest.approx((p.argmax(-1) == q.argmax(-1)).mean())
    assert r.reference_perplexity == pytest.approx(math.exp(-p[np.arange(39), ids[1:]].mean()))


def test_a_model_against_itself():
    ids = np.random.default_rng(3).integers(0, VOCAB, 300)
    r = evaluate(bigram(0), ids, context=64, stride=48, reference=bigram(0))
    assert r.kl_divergence == 0.0 and r.top1_agreement == 1.0
    assert r.reference_perplexity == r.perplexity


def test_bad_input():
    with pytest.raises(KilnError, match="at least 2 tokens"):
        evaluate(bigram(0), [5], context=8, stride=4)
    with pytest.raises(KilnError, match="stride"):
        evaluate(bigram(0), [1, 2, 3], context=8, stride=9)
    wide = lambda ids: np.zeros((*ids.shape, VOCAB + 1), np.float32)  # noqa: E731
    with pytest.raises(KilnError, match="different vocabularies"):
        evaluate(bigram(0), [1, 2, 3], context=8, stride=4, reference=wide)
    with pytest.raises(KilnError, match="all-position logits"):
        evaluate(lambda ids: np.zeros((1, 1, VOCAB)), [1, 2, 3], context=8, stride=4)
