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
from kiln.compiler.ir import PARAM_TRANSFORMS, Attrs, Graph, Node

BLOCK = 128  # columns per lazy batch update
DAMP = 0.01  # added to H's diagonal, relative to its mean

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


def gptq(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool = True,
         act_order: bool = False, damp: float = DAMP,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """w[N, K], H[K, K] -> (codes[N, Kp], scales[N, G], zero_points[N, G] | None), as
    `quantize` returns them. Without act order each group takes its scale from its columns as
    corrected so far, when the group starts; with it, from the weights before any correction."""
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
    H += damp * np.mean(np.diag(H)) * np.eye(kp)
    lo, hi = ((-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1))
    scales = np.zeros((n, ng), np.float32)
    zps = None if symmetric else np.zeros((n, ng), np.float32)

    def set_scales(cols: np.ndarray, first: int) -> None:  # groups first.. from columns cols
        _, s, z = quantize(cols.astype(np.float32), bits=bits, group=g, symmetric=symmetric)
        scales[:, first:first + s.shape[1]] = s
        if zps is not None:
            zps[:, first:first + s.shape[1]] = z + (128 if bits == 8 else 0)  # unsigned codes

    perm = np.arange(kp)
    if act_order:
        set_scales(W, 0)
        perm = np.argsort(-np.diag(H), kind="stable")
        W, H = W[:, perm], H[perm][:, perm]
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: Hinv = U^T U
    codes = np.zeros((n, kp), np.float64)
    for b0 in range(0, kp, BLOCK):
        b1 = min(b0 + BLOCK, kp)
        W1, E = W[:, b0:b1].copy(), np.zeros((n, b1 - b0))
        for i in range(b1 - b0):
            col = perm[b0 + i]
            if not act_order and col % g == 0:
                set_scales(W1[:, i:i + g], col // g)
            s = scales[:, col // g].astype(np.float64)
            z = 0.0 if zps is None else zps[:, col // g].astype(np.float64)
            q = np.clip(np.rint(W1[:, i] / s) + z, lo, hi)
            codes[:, col] = q
            d = U[b0 + i, b0 + i]
            e = (W1[:, i] - (q - z) * s) / d
            W1[:, i + 1:] -= np.outer(e, U[b0 + i, b0 + i + 1:b1])
            E[:, i] = e
        W[:, b1:] -= E @ U[b0:b1, b1:]
    if symmetric:
        c = codes.astype(np.int8) if bits == 8 else (codes + 8).astype(np.uint8)
        return c, scales, None
    if bits == 8:  # stored signed, as `quantize` does
        return (codes - 128).astype(np.int8), scales, zps - 128
    return codes.astype(np.uint8), scales, zps


#: solves of one compile, by (weight, Hessian, scheme): `calibrate` solves each weight once and
#: the parameter transforms (qweight, scales, zero points) read the same solve back
_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 1024


def solve(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
          act_order: bool = False, damp: float = DAMP,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """`gptq`, memoized by the contents of w and H."""
    w = np.ascontiguousarray(w, np.float32)
    h = np.ascontiguousarray(h, np.float64)
    key = (hashlib.blake2b(w.data, digest_size=16).hexdigest(),
           hashlib.blake2b(h.data, digest_size=16).hexdigest(), bits, group, symmetric, act_order,
           damp)
    if key not in _CACHE:
        _CACHE[key] = gptq(w, h, bits=bits, group=group, symmetric=symmetric, act_order=act_order,
                           damp=damp)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return _CACHE[key]


def solved_weight(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
                  act_order: bool = False, damp: float = DAMP) -> np.ndarray:
    """The float32 weight [N, K] that `solve`'s codes and scales stand for (what a calibration
    run computes with downstream of a quantized linear)."""
    from kiln.compiler.interpreter.transformer_ops import dequantize
    from kiln.passes.quantize import groups_of, pack_nibbles

    q, s, z = solve(w, h, bits=bits, group=group, symmetric=symmetric, act_order=act_order,
                    damp=damp)
    n, k = w.shape
    attrs = Attrs({"bits": bits, "group_size": groups_of(k, group)[0], "in_features": k,
                   "out_features": n})
    return dequantize(pack_nibbles(q) if bits == 4 else q, s, z, attrs)


def _gptq_part(w: np.ndarray, h: np.ndarray, *, bits: int, group: int, symmetric: bool,
               part: str, act_order: bool = False) -> np.ndarray:
    from kiln.passes.quantize import pack_nibbles

    q, scales, zp = solve(w, h, bits=bits, group=group, symmetric=symmetric, act_order=act_order)
    if part == "qweight":
        return pack_nibbles(q) if bits == 4 else q
    return scales if part == "scales" else zp


PARAM_TRANSFORMS["gptq"] = _gptq_part
