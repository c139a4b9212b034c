"""Perplexity of a model over a token stream, and its divergence from a reference model.

Sliding windows as in Hugging Face's perplexity guide: windows of `context` tokens start every
`stride` tokens; each window scores only the tokens the previous one did not (the first window
scores all but its first token). With `stride < context` every token after the first is scored
exactly once, with at least `context - stride` tokens of history once past the first window.

A model here is any function `ids (1, seq) -> logits (1, seq, vocab)`: `Session.prefill`, or
onnxruntime on an ONNX file. Log-probabilities are computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.compiler.errors import KilnError

LogitsFn = Callable[[np.ndarray], np.ndarray]
CHUNK = 128  # positions scored at a time


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    scored: int  # first token scored; tokens scored are [scored, end)


@dataclass
class EvalResult:
    tokens: int  # tokens scored
    nll: float  # sum of -log p(token) under the model
    ref_nll: float | None = None  # the same under the reference
    kl: float | None = None  # sum over positions of KL(reference || model), nats
    top1_agree: int | None = None  # positions where both models' argmax agree

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def reference_perplexity(self) -> float | None:
        return math.exp(self.ref_nll / self.tokens) if self.ref_nll is not None else None

    @property
    def kl_divergence(self) -> float | None:
        return self.kl / self.tokens if self.kl is not None else None

    @property
    def top1_agreement(self) -> float | None:
        return self.top1_agree / self.tokens if self.top1_agree is not None else None


def windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The windows that score tokens 1 .. n_tokens - 1 of a stream once each."""
    if context < 2:
        raise KilnError(f"context of {context} tokens is too short to score anything")
    if not 0 < stride <= context:
        raise KilnError(f"--stride {stride} must be between 1 and the context ({context})")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 1), stride):
        end = min(begin + context, n_tokens)
        out.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def evaluate(model: LogitsFn, ids: Sequence[int], *, context: int, stride: int,
             reference: LogitsFn | None = None,
             progress: Callable[[int, int], None] = lambda done, total: None) -> EvalResult:
    """Score `ids` with `model` (and `reference`) over sliding windows; `progress(done, total)`
    is called with tokens scored so far."""
    ids = np.asarray(ids, np.int64)
    if ids.ndim != 1 or len(ids) < 2:
        raise KilnError(f"need at least 2 tokens to score, got {ids.size}")
    result = EvalResult(0, 0.0, *((0.0, 0.0, 0) if reference is not None else ()))
    spans = windows(len(ids), context, stride)
    total = sum(w.end - w.scored for w in spans)
    for w in spans:
        feed = ids[None, w.begin:w.end]
        # logits at position j predict token j + 1: keep the rows that predict [scored, end)
        rows = slice(w.scored - 1 - w.begin, w.end - 1 - w.begin)
        logits = _logits(model, feed, "model")[0, rows]
        ref = _logits(reference, feed, "reference")[0, rows] if reference is not None else None
        if ref is not None and ref.shape != logits.shape:
            raise KilnError(f"the reference's logits are {ref.shape[-1]} wide, the model's "
                            f"{logits.shape[-1]} (different vocabularies)")
        target = ids[w.scored:w.end]
        for i in range(0, len(target), CHUNK):  # bounds the float64 temporaries
            _score(result, logits[i:i + CHUNK], None if ref is None else ref[i:i + CHUNK],
                   target[i:i + CHUNK])
        progress(result.tokens, total)
    return result


def _score(result: EvalResult, logits: np.ndarray, ref_logits: np.ndarray | None,
           target: np.ndarray) -> None:
    picked = np.arange(len(target)), target
    logp = log_softmax(logits)
    result.nll -= float(logp[picked].sum())
    result.tokens += len(target)
    if ref_logits is not None:
        ref = log_softmax(ref_logits)
        result.ref_nll -= float(ref[picked].sum())
        result.kl += float((np.exp(ref) * (ref - logp)).sum())
        result.top1_agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())


def _logits(fn: LogitsFn, feed: np.ndarray, who: str) -> np.ndarray:
    out = np.asarray(fn(feed))
    if out.ndim != 3 or out.shape[:2] != feed.shape:
        raise KilnError(f"the {who} returned logits of shape {out.shape} for {feed.shape} "
                        "tokens (all-position logits expected)")
    return out
