"""`linear` over weights packed at compile time: y[m, N] = x[m, K] @ w^T (+ b), w as [N/B, K, B].

Packed layout (B = SIMD lanes, 16 for fp32 on AVX-512):  # (N / B, K, B)
    packed[nb, k, lane] = w[nb * B + lane, k]
so one vector load gives B consecutive output columns at one k. The micro-kernel keeps an
`mr x nv` tile of accumulator vectors (mr rows of x, nv column blocks of B), and per k does nv
vector loads and mr scalar broadcasts of x for mr * nv FMAs: no horizontal reductions, and the
output tile is stored as whole vectors. Parallel tasks own panels of nv column blocks; within a
task the panel (K * nv * B floats) stays in L2 while every row tile of x streams past it.
Decode (m = 1) is the same kernel with mr = 1: each task streams its panel once (a GEMV).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import tirx
from tvm.script import tirx as T


@dataclass(frozen=True, slots=True)
class PackedConfig:
    """Register tile: mr rows of x by nv vectors of output columns."""

    mr: int = 6
    nv: int = 4

    def __post_init__(self) -> None:
        if self.mr < 1 or self.nv < 1 or self.mr * self.nv + self.nv + 1 > 32:
            raise ValueError(f"bad packed linear tiling {self}")


#: prefill: 24 accumulators + 3 weight vectors + 1 broadcast of the 32 zmm registers; measured
#: best of SEARCH_SPACE on Zen 4 for the SmolLM2 shapes at m = 128 and 512
PREFILL = PackedConfig(mr=8, nv=3)
#: decode: one row; small panels balance the two threads and keep 2 FMA chains in flight
DECODE = PackedConfig(mr=1, nv=2)
#: tilings checked against numpy by the kernel tests and timed by benchmarks/cpu_kernels.py
SEARCH_SPACE: tuple[PackedConfig, ...] = (
    PackedConfig(1, 1), PackedConfig(1, 2), PackedConfig(1, 4), PackedConfig(4, 4),
    PackedConfig(6, 4), PackedConfig(8, 3), PackedConfig(4, 6), PackedConfig(12, 2))


def pack(w: np.ndarray, block: int) -> np.ndarray:
    """w[N, K] -> [N / block, K, block] (numpy reference of the compile-time transform)."""
    n, k = w.shape
    return np.ascontiguousarray(w.reshape(n // block, block, k).transpose(0, 2, 1))


def packed_linear_kernel(n: int, k: int, cfg: PackedConfig, *, bias: bool = False,
                         lanes: int = 16, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(x[m, k], w[n / lanes, k, lanes], (b[n],) y[m, n]) with m symbolic (int64)."""
    if n % lanes:
        raise ValueError(f"packed linear: N={n} is not a multiple of {lanes}")
    blocks, nv, mr = n // lanes, cfg.nv, cfg.mr
    panels, nv_tail = blocks // nv, blocks % nv
    micro = _micro(k, lanes, dtype, bias)

    @T.macro
    def panel(xb, wb, bb, yb, m, nb0, width):
        for mt in range(m // mr):
            micro(xb, wb, bb, yb, mt * mr, nb0, mr, width)
        for mm in range(m // mr * mr, m):
            micro(xb, wb, bb, yb, mm, nb0, 1, width)

    @T.macro
    def tiles(xb, wb, bb, yb, m):
        for p in T.parallel(panels):
            panel(xb, wb, bb, yb, m, p * nv, nv)
        if nv_tail > 0:
            panel(xb, wb, bb, yb, m, panels * nv, nv_tail)

    if bias:

        @T.prim_func(private=True)
        def packed_linear_bias(x_h: T.handle, w: T.Buffer((blocks, k, lanes), dtype),
                               b: T.Buffer((n,), dtype), y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            y = T.match_buffer(y_h, (m, n), dtype)
            tiles(x, w, b, y, m)

        return packed_linear_bias

    @T.prim_func(private=True)
    def packed_linear(x_h: T.handle, w: T.Buffer((blocks, k, lanes), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        tiles(x, w, None, y, m)

    return packed_linear


def _micro(k: int, lanes: int, dtype: str, bias: bool):
    @T.macro
    def micro(xb, wb, bb, yb, m0, nb0, mr, nv):
        acc = T.decl_buffer((mr * nv * lanes,), dtype, scope="local")
        for t in T.unroll(mr * nv):
            for lane in T.vectorized(lanes):
                acc[t * lanes + lane] = T.cast(0, dtype)
        for kk in range(k):
            for i in T.unroll(mr):
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        acc[(i * nv + j) * lanes + lane] += xb[m0 + i, kk] * wb[nb0 + j, kk, lane]
        for i in T.unroll(mr):
            for j in T.unroll(nv):
                for lane in T.vectorized(lanes):
                    if bias:
                        yb[m0 + i, (nb0 + j) * lanes + lane] = (
                            acc[(i * nv + j) * lanes + lane] + bb[(nb0 + j) * lanes + lane])
                    else:
                        yb[m0 + i, (nb0 + j) * lanes + lane] = acc[(i * nv + j) * lanes + lane]

    return micro
