"""Mixed precision by measured sensitivity: which weights get int8 instead of the preset's scheme.

Each candidate weight W[N, K] is rounded to nearest in both schemes and its measured cost is the
relative output error of its linear on the calibration inputs X (fp32 model, Hessian H = X^T X):

    nsr(W, Q) = tr((W - Q) H (W - Q)^T) / tr(W H W^T)   (noise-to-signal of y = x @ W^T)

The weights are then taken greedily in order of error removed per extra byte,
(nsr_low - nsr_int8) / (bytes_int8 - bytes_low), until the extra bytes reach the budget. The
choice is per model and per calibration text, not a fixed list of roles: it is what
`QuantPreset.int8_budget` asks for (kiln.passes.quantize).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from kiln.runtime import quant_format as qf

#: (bits, group size, symmetric) of a weight
Scheme = tuple[int, int, bool]
INT8: Scheme = (8, 0, True)


def scheme_bytes(n: int, k: int, scheme: Scheme) -> int:
    """Stored bytes of a weight [N, K] in `scheme`: codes, float32 scales and zero points."""
    bits, group, symmetric = scheme
    g, ng = qf.groups_of(k, group)
    codes = n * qf.packed_columns(ng * g, bits)
    return codes + n * ng * 4 * (1 if symmetric else 2)


def output_nsr(w: np.ndarray, h: np.ndarray, scheme: Scheme) -> float:
    """nsr(W, RTN(W)) under the input Hessian h [K, K] (see the module docstring)."""
    bits, group, symmetric = scheme
    q, s, z = qf.quantize_codes(w, bits=bits, group=group, symmetric=symmetric,
                                clip=qf.CLIP_SEARCH)
    deq = qf.dequantize(qf.pack_codes(q, bits), s, z, bits=bits, k=w.shape[1])
    d = (np.asarray(w, np.float64) - deq).astype(np.float64)
    signal = float(np.einsum("nk,nk->", np.asarray(w, np.float64) @ h, w))
    return float(np.einsum("nk,nk->", d @ h, d)) / max(signal, 1e-30)


def choose_int8(costs: dict[str, tuple[float, float, int, int]], budget: int) -> set[str]:
    """costs: weight -> (nsr at its scheme, nsr at int8, its bytes, bytes at int8); the weights
    whose extra int8 bytes fit `budget`, best error removed per extra byte first."""
    gains = sorted(((lo - hi) / max(b8 - b, 1), name)
                   for name, (lo, hi, b, b8) in costs.items() if b8 > b and lo > hi)
    chosen, spent = set(), 0
    for _, name in reversed(gains):
        extra = costs[name][3] - costs[name][2]
        if spent + extra <= budget:
            chosen.add(name)
            spent += extra
    return chosen


def measure(weights: Iterable[tuple[str, np.ndarray, np.ndarray, Scheme]],
            ) -> dict[str, tuple[float, float, int, int]]:
    """(name, W[N, K], H[K, K], scheme) -> name -> (nsr at scheme, nsr at int8, bytes, bytes at
    int8), the input of `choose_int8`."""
    out = {}
    for name, w, h, scheme in weights:
        n, k = w.shape
        out[name] = (output_nsr(w, h, scheme), output_nsr(w, h, INT8),
                     scheme_bytes(n, k, scheme), scheme_bytes(n, k, INT8))
    return out


def budget_of(shapes: dict[str, tuple[int, int]], scheme: Scheme, fraction: float) -> int:
    """`fraction` of the bytes all these weights take in `scheme`: the int8 budget's bytes."""
    return int(fraction * sum(scheme_bytes(n, k, scheme) for n, k in shapes.values()))
