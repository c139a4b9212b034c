"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For y = x @ W^T the output error of a weight error dW is ||X dW^T||^2, whose Hessian per output row
is H = X^T X over calibration inputs X. Quantizing column i with error e_i, the remaining columns
move by -e_i * Hinv[i, i+1:] / Hinv[i, i] (the optimal correction), with Hinv's upper Cholesky
factor standing in for the shrinking inverse. The result has exactly the layout and dequantization
of round-to-nearest (`kiln.passes.quantize.quantize`): only the codes differ.

Two refinements of the reference implementation, each measured on SmolLM2-135M
(benchmarks/RESULTS.md, "CPU quantization, session 3"):
- act order: columns are quantized in order of decreasing H[i, i] (the inputs with the most energy
  first, while the most columns remain to absorb their error). The group scales are then fixed up
  front from the weights (with the clip search of `quantize`), "static groups", so that groups stay
  contiguous in K and the kernels need no column permutation.
- sequential calibration (`calibrate`): the calibration batch runs through the graph node by node,
  and each linear is quantized from the Hessian of its input as the already-quantized layers before
  it produce it, so that later layers correct what earlier layers got wrong.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import numpy as np

from kiln.compiler.interpreter import run
from kiln.compiler.ir import PARAM_TRANSFORMS, Graph, Node
from kiln.runtime import quant_format as qf
from kiln.runtime.pruning import Pattern, smallest

BLOCK = 128  # columns per lazy batch update
DAMP = 0.01  # added to H's diagonal, relative to its mean
#: conjugate-gradient steps re-solving a SparseGPT weight's kept entries (0: the sweep's as they
#: are); on SmolLM2's o_proj and down_proj 10 steps come within 3% of the converged output error,
#: 30 within 0.1% (benchmarks/logs/sparsegpt_refine_session10.md)
REFINE = 30

#: weight name, its fp32 value [N, K] and the Hessian of its input -> the weight as quantized
Solve = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


def calibrate(graph: Graph, weights: Iterable[str], windows: list[np.ndarray],
              solve: Solve) -> dict[str, np.ndarray]:
    """Run the calibration windows (one batch) through `graph` node by node; at the first linear
    reading each of `weights`, H = x^T x of its input (float64) is taken, `solve` quantizes the
    weight, and the quantized weight is what that linear (and every later reader) computes with.
    Returns weight name -> H. The LM head (a linear producing a graph output) is not run: only
    its input matters."""
    wanted = set(weights)
    quantized: dict[str, np.ndarray] = {}  # read by the interpreter as parameters
    out: dict[str, np.ndarray] = {}

    def before(node: Node, values) -> None:
        w = node.inputs[1] if node.op == "linear" and len(node.inputs) > 1 else ""
        if w in wanted and w not in quantized:
            x = np.asarray(values[node.inputs[0]], np.float64)
            x = x.reshape(-1, x.shape[-1])
            out[w] = x.T @ x
            quantized[w] = solve(w, np.asarray(graph.params[w].load(), np.float32), out[w])

    run(graph, _feeds(graph, np.concatenate(windows, axis=0)), outputs=[], params=quantized,
        before=before, skip=lambda n: n.op == "linear" and n.outputs[0] in graph.outputs)
    return out


def _feeds(graph: Graph, ids: np.ndarray) -> dict[str, np.ndarray]:
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64),
             "position_ids": np.arange(s, dtype=np.int64)[None].repeat(b, 0)}
    for name in graph.inputs:
        t = graph.types[name]
        if name not in feeds and t.shape is not None and len(t.shape) == 4:  # an empty past
            feeds[name] = np.zeros((b, int(t.shape[1]), 0, int(t.shape[3])), t.dtype.numpy)
    return {k: v for k, v in feeds.items() if k in graph.inputs}


def hessian(h: np.ndarray, kp: int, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(H [kp, kp] as the sweep uses it, dead[kp]): H padded with identity to kp columns, the
    columns no calibration input reached (H[i, i] == 0) given H[i, i] = 1, then `damp` times
    the mean diagonal added to the diagonal (SparseGPT and GPTQ alike)."""
    k = h.shape[0]
    H = np.eye(kp)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * np.mean(np.diag(H)) * np.eye(kp)
    return H, dead


def inverse_factor(H: np.ndarray) -> np.ndarray:
    """U, the upper Cholesky factor of H^-1 (H^-1 = U^T U): row i of U holds the optimal update
    of the columns after i when column i is fixed."""
    return np.linalg.cholesky(np.linalg.inv(H)).T


class _Rounder:
    """GPTQ's quantization of one column at a time: group scales set when a group starts (or
    up front, static), codes kept; a pruned entry gets the zero point's code, so it dequantizes
    to exactly 0."""

    def __init__(self, n: int, kp: int, *, bits: int, group: int, symmetric: bool):
        self.bits, self.g, self.symmetric = bits, group, symmetric
        ng = kp // group
        self.lo, self.hi = qf.code_range(bits, symmetric)
        self.scales = np.zeros((n, ng), np.float32)
        self.zps = None if symmetric else np.zeros((n, ng), np.float32)
        self.codes = np.zeros((n, kp), np.float64)

    def set_scales(self, cols: np.ndarray, first: int) -> None:
        """Groups first.. take their scales from the weight columns `cols` (rounded to nearest
        with the clip search, as kiln.passes.quantize.quantize)."""
        _, s, z = qf.quantize_codes(cols.astype(np.float32), bits=self.bits, group=self.g,
                                    symmetric=self.symmetric, clip=qf.CLIP_SEARCH)
        self.scales[:, first:first + s.shape[1]] = s
        if self.zps is not None:  # the codes' arithmetic zero points, not their stored form
            self.zps[:, first:first + s.shape[1]] = z - qf.storage_shift(self.bits, False)

    def __call__(self, col: int, w: np.ndarray, pruned: np.ndarray) -> np.ndarray:
        s = self.scales[:, col // self.g].astype(np.float64)
        z = 0.0 if self.zps is None else self.zps[:, col // self.g].astype(np.float64)
        q = np.where(pruned, z, np.clip(np.rint(w / s) + z, self.lo, self.hi))
        self.codes[:, col] = q
        return (q - z) * s

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        q, zp = qf.store(self.codes, self.zps, bits=self.bits, symmetric=self.symmetric)
        return q, self.scales, zp


def sweep(W: np.ndarray, U: np.ndarray, *, real: np.ndarray, pattern: Pattern | None = None,
          fixed: np.ndarray | None = None,
          fix: Callable[[int, np.ndarray, np.ndarray], np.ndarray] | None = None,
          on_column: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
          ) -> tuple[np.ndarray, np.ndarray]:
    """The optimal-brain-surgeon column sweep shared by GPTQ and SparseGPT, over W[N, Kp] and
    U (inverse_factor of H), both already in sweep order; returns (the final weight, pruned).

    Column i is fixed to `fix(i, w, pruned)` (default: w with pruned entries zeroed) and the
    error, divided by U[i, i], moves the columns after it by -e U[i, i+1:] (lazily, a block of
    BLOCK columns at a time). Entries are pruned where `fixed` says, or as `pattern` chooses
    them: per block of columns, every row drops its share of its round(S * K) entries, those of
    least W^2 / U[i, i]^2 (SparseGPT's adaptive mask selection, kept row-uniform so every row
    holds the same count); for N:M the M - N least of each group of M columns when the group
    starts. `real` marks the columns that are not padding (never pruned, never counted).
    `on_column(i, W1, pruned1)` sees a block's columns before column i is fixed (GPTQ sets
    group scales there)."""
    n, kp = W.shape
    W = W.copy()
    pruned = np.zeros((n, kp), bool) if fixed is None else fixed.copy()
    out = np.zeros((n, kp), np.float64)
    width = BLOCK
    if pattern is not None and pattern.structured:
        width = max(pattern.m, BLOCK - BLOCK % pattern.m)
    seen = np.concatenate([[0], np.cumsum(real)])  # real columns before each position
    d_all = np.diag(U)
    for b0 in range(0, kp, width):
        b1 = min(b0 + width, kp)
        W1, E = W[:, b0:b1].copy(), np.zeros((n, b1 - b0))
        P1 = pruned[:, b0:b1]
        d = d_all[b0:b1]
        if pattern is not None and not pattern.structured:
            count = (round(pattern.fraction * int(seen[b1]))
                     - round(pattern.fraction * int(seen[b0])))
            score = np.where(real[b0:b1], W1 ** 2 / d ** 2, np.inf)
            P1 |= smallest(score, count)
        for i in range(b1 - b0):
            if pattern is not None and pattern.structured and (b0 + i) % pattern.m == 0:
                g = slice(i, i + pattern.m)
                P1[:, g] |= smallest(W1[:, g] ** 2 / d[g] ** 2, pattern.m - pattern.n)
            if on_column is not None:
                on_column(b0 + i, W1[:, i:], P1[:, i:])
            w = W1[:, i]
            q = fix(b0 + i, w, P1[:, i]) if fix is not None else np.where(P1[:, i], 0.0, w)
            out[:, b0 + i] = q
            e = (w - q) / d[i]
            W1[:, i + 1:] -= np.outer(e, U[b0 + i, b0 + i + 1:b1])
            E[:, i] = e
        W[:, b1:] -= E @ U[b0:b1, b1:]
    return out, pruned


def gptq(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
         act_order: bool = False, damp: float = DAMP, keep_zeros: bool = False,
         prune: Pattern | None = None,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K], H[K, K] -> (codes[N, Kp], scales[N, G], zero_points[N, G] | None), as
    `quantize` returns them. Without act order each group takes its scale from its columns as
    corrected so far, when the group starts; with it, from the weights before any correction.
    `keep_zeros`: w's exact zeros (a pruned weight) stay exactly zero, their share of the
    correction falling on the kept entries. `prune`: SparseGPT with joint quantization, the
    mask chosen inside the sweep (an N:M pattern sweeps in column order, without act order)."""
    n, k = w.shape
    g, ng = qf.groups_of(k, group)
    kp = ng * g
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    H, dead = hessian(h, kp, damp)
    W[:, dead] = 0.0
    act_order = act_order and not (prune is not None and prune.structured)
    rounder = _Rounder(n, kp, bits=bits, group=g, symmetric=symmetric)
    perm = np.arange(kp)
    if act_order:
        rounder.set_scales(W, 0)
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]

    def on_column(i: int, rest: np.ndarray, pruned: np.ndarray) -> None:
        if not act_order and perm[i] % g == 0:
            rounder.set_scales(np.where(pruned[:, :g], 0.0, rest[:, :g]), perm[i] // g)

    fixed = (W == 0) & (np.arange(kp) < k)[perm] if keep_zeros else None
    sweep(W, inverse_factor(H), real=perm < k, pattern=prune, fixed=fixed,
          fix=lambda i, col, pruned: rounder(perm[i], col, pruned), on_column=on_column)
    return rounder.result()


def sparsegpt(w: np.ndarray, h: np.ndarray, pattern: Pattern, *, damp: float = DAMP,
              refine: int = 0) -> np.ndarray:
    """w[N, K] pruned to `pattern` by SparseGPT (Frantar & Alistarh, 2023): each column's pruned
    entries zeroed in turn, the error pushed onto the columns not yet swept, the mask chosen
    from the corrected weights as the sweep reaches them; then, with `refine` > 0, the kept
    entries re-solved by least squares for that mask (`refit`). Float32, pruned entries
    exactly 0."""
    k = w.shape[1]
    H, dead = hessian(h, k, damp)
    W = np.asarray(w, np.float64).copy()
    W[:, dead] = 0.0
    out, pruned = sweep(W, inverse_factor(H), real=np.ones(k, bool), pattern=pattern)
    if refine > 0:
        out = refit(out, W, H, ~pruned, steps=refine)
    out = out.astype(np.float32)
    out[pruned] = 0.0
    return out


def refit(x: np.ndarray, w: np.ndarray, H: np.ndarray, keep: np.ndarray, *, steps: int,
          ) -> np.ndarray:
    """x[N, K] moved, on its `keep` entries only, toward the minimum of (x - w) H (x - w)^T of
    every row: the output error ||X (x - w)^T||^2 of the weight w (H = X^T X, damped) for a
    fixed mask, which the sweep only approximates (a column's kept entries are never corrected
    after it is swept). Jacobi-preconditioned conjugate gradients, `steps` of them, all rows
    at once (each row its own system H[keep, keep]); x = 0 off `keep`."""
    x = np.where(keep, x, 0.0)
    r = np.where(keep, (w - x) @ H, 0.0)  # minus half the gradient
    dinv = 1.0 / np.diag(H)
    z = r * dinv
    p, rz = z, np.einsum("nk,nk->n", r, z)
    tiny = np.finfo(np.float64).tiny
    for _ in range(steps):
        hp = np.where(keep, p @ H, 0.0)
        a = rz / np.maximum(np.einsum("nk,nk->n", p, hp), tiny)
        x = x + a[:, None] * p
        r = r - a[:, None] * hp
        z = r * dinv
        rz, last = np.einsum("nk,nk->n", r, z), rz
        p = z + (rz / np.maximum(last, tiny))[:, None] * p
    return x


#: solves of one compile, by (kind, weight, Hessian, options): `calibrate` solves each weight
#: once and the parameter transforms (qweight, scales, zero points) read the same solve back
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 1024

#: a weight with at least this fraction of exact zeros is taken for pruned: GPTQ keeps its zeros
PRUNED = 0.25


def memoized(kind: str, arrays: tuple[np.ndarray, ...], options: tuple, compute: Callable):
    """compute(), memoized by `kind`, the contents of `arrays` and `options`."""
    key = (kind, *(hashlib.blake2b(np.ascontiguousarray(a).data, digest_size=16).hexdigest()
                   for a in arrays), *options)
    if key not in _CACHE:
        _CACHE[key] = compute()
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key]


def solve(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
          act_order: bool = False, damp: float = DAMP, keep_zeros: bool = False,
          prune: Pattern | None = None,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`gptq`, memoized by the contents of w and H; a weight that is mostly zeros (a pruned
    checkpoint) keeps its zeros."""
    w = np.ascontiguousarray(w, np.float32)
    h = np.ascontiguousarray(h, np.float64)
    keep_zeros = keep_zeros or (prune is None and float((w == 0).mean()) >= PRUNED)
    return memoized("gptq", (w, h), (bits, group, symmetric, act_order, damp, keep_zeros, prune),
                    lambda: gptq(w, h, bits=bits, group=group, symmetric=symmetric,
                                 act_order=act_order, damp=damp, keep_zeros=keep_zeros,
                                 prune=prune))


def solved_weight(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
                  act_order: bool = False, damp: float = DAMP, **pruning) -> np.ndarray:
    """The float32 weight [N, K] that `solve`'s codes and scales stand for (what a calibration
    run computes with downstream of a quantized linear); `pruning`: `_pruning`'s attributes."""
    q, s, z = solve(w, h, bits=bits, group=group, symmetric=symmetric, act_order=act_order,
                    damp=damp, **_pruning(**pruning))
    return qf.dequantize(qf.pack_codes(q, bits), s, z, bits=bits, k=w.shape[1])


def _pruning(keep_zeros: bool = False, prune_fraction: float = 0.0, prune_n: int = 0,
             prune_m: int = 0) -> dict:
    """A derivation's pruning attributes (kiln.passes.prune_weights.gptq_source) -> `solve`'s."""
    prune = Pattern(prune_fraction, prune_n, prune_m) if prune_fraction else None
    return {"keep_zeros": keep_zeros, "prune": prune}


def _gptq_part(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
               part: str, act_order: bool = False, **pruning) -> np.ndarray:
    q, scales, zp = solve(w, h, bits=bits, group=group, symmetric=symmetric, act_order=act_order,
                          **_pruning(**pruning))
    if part == "qweight":
        return qf.pack_codes(q, bits)
    return scales if part == "scales" else zp


PARAM_TRANSFORMS["gptq"] = _gptq_part
