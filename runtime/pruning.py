"""Weight pruning patterns and masks, numpy only (the compiler's pruning pass and the GPU host's
converter, which replays magnitude pruning, share them).

A pattern says which entries of a weight W[N, K] (y = x @ W^T) are set to zero:
    fraction S (0 < S < 1)  unstructured: exactly round(S * K) entries of every row
    N:M                     semi-structured: N entries kept in every group of M consecutive
                            input columns (K % M == 0); 2:4 is what sparse tensor cores take
Which entries go is decided by a score (smaller goes first): |W| for magnitude pruning,
|W| * ||x_k|| for Wanda, W^2 / Hinv[k, k]^2 inside SparseGPT's sweep (kiln.passes.gptq).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class PatternError(ValueError):
    """A pattern spec that means nothing, or a weight the pattern does not fit."""


@dataclass(frozen=True, slots=True)
class Pattern:
    """Unstructured when `n == 0` (a fraction of every row), else n kept of every m columns."""

    fraction: float = 0.0
    n: int = 0
    m: int = 0

    @classmethod
    def parse(cls, spec: str | float) -> Pattern:
        """`0.5` (a fraction in (0, 1)) or `2:4` (N:M with 0 < N < M)."""
        text = str(spec).strip()
        if ":" in text:
            a, _, b = text.partition(":")
            try:
                n, m = int(a), int(b)
            except ValueError:
                raise PatternError(f"--sparsity {text}: N:M needs two integers, e.g. 2:4") \
                    from None
            if not 0 < n < m:
                raise PatternError(f"--sparsity {text}: N:M keeps N of every M columns, so "
                                   "0 < N < M (e.g. 2:4)")
            return cls(1 - n / m, n, m)
        try:
            s = float(text)
        except ValueError:
            raise PatternError(f"--sparsity {text}: expected a fraction such as 0.5 or N:M "
                               "such as 2:4") from None
        if not 0 < s < 1:
            raise PatternError(f"--sparsity {text}: the fraction of weights pruned must be "
                               "between 0 and 1 (exclusive)")
        return cls(s)

    @property
    def structured(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"

    def check(self, k: int, where: str) -> None:
        """Refuse an N:M pattern on a weight whose K is not a multiple of M."""
        if self.structured and k % self.m:
            raise PatternError(f"{where}: --sparsity {self} needs the input dimension to be a "
                               f"multiple of {self.m}, got {k}")

    def zeros(self, k: int) -> int:
        """Entries pruned per row of K columns."""
        return k - k // self.m * self.n if self.structured else round(self.fraction * k)

    def to_dict(self) -> dict:
        return {"fraction": self.fraction, "n": self.n, "m": self.m}

    @classmethod
    def from_dict(cls, d: dict) -> Pattern:
        return cls(float(d["fraction"]), int(d.get("n", 0)), int(d.get("m", 0)))


def smallest(score: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask of the `count` smallest scores of every row (ties: the lower column)."""
    mask = np.zeros(score.shape, bool)
    if count <= 0:
        return mask
    order = np.argsort(score, axis=-1, kind="stable")[..., :count]
    np.put_along_axis(mask, order, True, axis=-1)
    return mask


def mask(score: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Entries of score[N, K] to prune: the smallest of every row, or of every group of M."""
    n, k = score.shape
    if not pattern.structured:
        return smallest(score, pattern.zeros(k))
    pattern.check(k, "weight")
    groups = score.reshape(n, k // pattern.m, pattern.m)
    return smallest(groups, pattern.m - pattern.n).reshape(n, k)


def prune(w: np.ndarray, score: np.ndarray, pattern: Pattern) -> np.ndarray:
    """w with the entries `mask(score, pattern)` selects set to exactly zero (w's dtype)."""
    out = np.array(w, copy=True)
    out[mask(score, pattern)] = 0
    return out


def prune_magnitude(w: np.ndarray, *, fraction: float, n: int = 0, m: int = 0) -> np.ndarray:
    """The parameter transform "prune_magnitude": the smallest |w| of every row (or group)."""
    w = np.asarray(w)
    return prune(w, np.abs(w.astype(np.float32)), Pattern(fraction, n, m))
