"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the columns
not yet quantized, weighted by the inverse Hessian of the layer's inputs (Frantar et al., 2022).

For y = x @ W^T the output error of a weight error dW is ||X dW^T||^2, whose Hessian per output row
is H = X^T X over calibration inputs X. Quantizing column i with error e_i, the remaining columns
move by -e_i * Hinv[i, i+1:] / Hinv[i, i] (the optimal correction), with Hinv's upper Cholesky
factor standing in for the shrinking inverse. Groups take their scale (with the clip search of
`kiln.passes.quantize.quantize`) from the already-corrected columns when the group starts, so the
result has exactly the layout and dequantization of round-to-nearest: only the codes differ.

`hessians` runs the fp32 canonical graph on calibration text through the numpy interpreter and
accumulates H for the input of every linear node.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from kiln.compiler.interpreter import run
from kiln.compiler.ir import PARAM_TRANSFORMS, Graph

BLOCK = 128  # columns per lazy batch update
DAMP = 0.01  # added to H's diagonal, relative to its mean


def hessians(graph: Graph, values: Iterable[str], windows: list[np.ndarray]) -> dict:
    """value name -> H = sum of x^T x (float64, K x K) over the calibration windows."""
    wanted = sorted(set(values))
    out: dict[str, np.ndarray] = {}
    for ids in windows:
        got = run(graph, _feeds(graph, ids), outputs=wanted)
        for v in wanted:
            x = np.asarray(got[v], np.float64).reshape(-1, got[v].shape[-1])
            out[v] = out.get(v, 0) + x.T @ x
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


def gptq(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K], H[K, K] -> (codes[N, Kp], scales[N, G], zero_points[N, G] | None), as
    `quantize` returns them."""
    from kiln.passes.quantize import groups_of, quantize

    n, k = w.shape
    g, ng = groups_of(k, group)
    kp = ng * g
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    H = np.eye(kp)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * np.mean(np.diag(H)) * np.eye(kp)
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinv = U^T U
    codes = np.zeros((n, kp), np.float64)
    scales = np.zeros((n, ng), np.float32)
    zps = None if symmetric else np.zeros((n, ng), np.float32)
    lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1))
    block = max(BLOCK // g, 1) * g
    for b0 in range(0, kp, block):
        b1 = min(b0 + block, kp)
        W1, E = W[:, b0:b1].copy(), np.zeros((n, b1 - b0))
        for i in range(b1 - b0):
            col = b0 + i
            if col % g == 0:  # the group's scale from its columns as corrected so far
                _, s, z = quantize(W1[:, i:i + g].astype(np.float32), bits=bits, group=g,
                                   symmetric=symmetric)
                scales[:, col // g] = s[:, 0]
                if zps is not None:
                    zps[:, col // g] = z[:, 0] + (128 if bits == 8 else 0)  # unsigned codes
            s = scales[:, col // g].astype(np.float64)
            z = 0.0 if zps is None else zps[:, col // g].astype(np.float64)
            q = np.clip(np.rint(W1[:, i] / s) + z, lo, hi)
            codes[:, col] = q
            e = (W1[:, i] - (q - z) * s) / U[col, col]
            W1[:, i + 1:] -= np.outer(e, U[col, col + 1:b1])
            E[:, i] = e
        W[:, b1:] -= E @ U[b0:b1, b1:]
    if symmetric:
        c = codes.astype(np.int8) if bits == 8 else (codes + 8).astype(np.uint8)
        return c, scales, None
    if bits == 8:  # stored signed, as `quantize` does
        return (codes - 128).astype(np.int8), scales, zps - 128
    return codes.astype(np.uint8), scales, zps


_CACHE: OrderedDict = OrderedDict()  # the three parts of one weight come from one solve


def _gptq_part(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
               part: str) -> np.ndarray:
    from kiln.passes.quantize import pack_nibbles

    key = (hashlib.blake2b(np.ascontiguousarray(w).data, digest_size=16).hexdigest(),
           hashlib.blake2b(np.ascontiguousarray(h).data, digest_size=16).hexdigest(),
           bits, group, symmetric)
    if key not in _CACHE:
        _CACHE[key] = gptq(np.asarray(w, np.float32), np.asarray(h, np.float64), bits=bits,
                           group=group, symmetric=symmetric)
        while len(_CACHE) > 4:
            _CACHE.popitem(last=False)
    q, scales, zp = _CACHE[key]
    if part == "qweight":
        return pack_nibbles(q) if bits == 4 else q
    return scales if part == "scales" else zp


PARAM_TRANSFORMS["gptq"] = _gptq_part
