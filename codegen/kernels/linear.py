"""`linear` as a TIR kernel: y[m, N] = x[m, K] @ w[N, K]^T (+ b), w row-major as kiln stores it.

Both operands are contiguous along K, so the kernel is a register-tiled dot product: an `mr x nr`
tile of outputs keeps one SIMD accumulator per output, walks K one vector at a time (mr + nr loads
for mr * nr FMAs), then reduces each accumulator horizontally by halving. No packing is needed.
Work is split over threads by tiles of `nr` weight rows; `mb` optionally blocks the rows of x so a
block stays in L2 while every weight tile streams past it. m (rows = batch * seq) is symbolic.
The same kernel serves decode (mr=1: a bandwidth-bound GEMV) and prefill (a compute-bound GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T


@dataclass(frozen=True, slots=True)
class LinearConfig:
    """Tile sizes and prefetch distance: the knobs `kiln tune` searches per shape."""

    mr: int = 4  # rows of x per register tile
    nr: int = 4  # weight rows per register tile (and per unit of parallel work)
    mb: int = 0  # rows of x per cache block (0: all rows)
    nb: int = 0  # weight rows per parallel task, kept in L2 across an x block (0: nr)
    prefetch: int = 0  # software-prefetch the weight tile this many tiles ahead (0: none)

    def __post_init__(self) -> None:
        if self.mr < 1 or self.nr < 1 or self.mb < 0 or self.nb < 0:
            raise ValueError(f"bad linear tiling {self}")
        if self.prefetch < 0:
            raise ValueError(f"bad linear prefetch distance {self}")


#: tilings the tuner may choose from (mr * nr accumulators + mr + nr loads <= 32 registers)
SEARCH_SPACE: tuple[LinearConfig, ...] = tuple(
    LinearConfig(mr, nr, mb, nb) for mr in (1, 2, 4, 6) for nr in (1, 2, 4, 8, 16)
    for mb, nb in ((0, 0), (96, 64), (192, 128)) if mr * nr + mr + nr <= 32)
#: decode: one row of x, the weights stream once (bandwidth-bound)
DECODE = LinearConfig(mr=1, nr=16)
#: prefill: measured best-or-tied on Zen 4 for the SmolLM2 shapes at m = 512
PREFILL = LinearConfig(mr=6, nr=4, mb=96, nb=64)


def linear_kernel(n: int, k: int, cfg: LinearConfig, *, bias: bool = False, lanes: int = 16,
                  dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(x[m, k], w[n, k], (b[n],) y[m, n]) with m symbolic (int64)."""
    if lanes & (lanes - 1) or lanes < 2:
        raise ValueError(f"lanes must be a power of two >= 2, got {lanes}")
    micro = _microkernel(k, lanes, dtype, bias, cfg.prefetch * cfg.nr)
    mr, nr, mb = cfg.mr, cfg.nr, cfg.mb
    n_main = n // nr * nr

    tiles_n = n // nr  # full nr-row weight tiles
    tb = max(1, cfg.nb // nr)  # weight tiles per parallel block (kept in L2 while x streams)

    @T.macro
    def row_block(xb, wb, bb, yb, r0, rows, pb):
        for mt in range(rows // mr):  # an mr-row x tile stays in L1 across the weight block
            for nt in range(T.min(tb, tiles_n - pb * tb)):
                micro(xb, wb, bb, yb, r0 + mt * mr, (pb * tb + nt) * nr, mr, nr)
        for mm in range(r0 + rows // mr * mr, r0 + rows):
            for nt in range(T.min(tb, tiles_n - pb * tb)):
                micro(xb, wb, bb, yb, mm, (pb * tb + nt) * nr, 1, nr)

    @T.macro
    def tiles(xb, wb, bb, yb, m):
        for pb in T.parallel((tiles_n + tb - 1) // tb):
            if mb > 0:
                for blk in range((m + mb - 1) // mb):
                    row_block(xb, wb, bb, yb, blk * mb, T.min(mb, m - blk * mb), pb)
            else:
                row_block(xb, wb, bb, yb, 0, m, pb)
        for nn in range(n_main, n):  # weight rows left over by the nr tiling
            for mm in range(m):
                micro(xb, wb, bb, yb, mm, nn, 1, 1)

    if bias:
        return _with_bias(n, k, dtype, tiles)

    @T.prim_func(private=True)
    def linear(x_h: T.handle, w: T.Buffer((n, k), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        tiles(x, w, None, y, m)

    return linear


def _microkernel(k: int, lanes: int, dtype: str, bias: bool,
                 ahead: int):
    kv, kt = k // lanes, k % lanes

    @T.macro
    def halve(acc, base, h):
        for lane in T.vectorized(h):
            acc[base + lane] += acc[base + lane + h]

    @T.macro
    def micro(xb, wb, bb, yb, m0, n0, mr, nr):
        acc = T.decl_buffer((mr * nr * lanes,), dtype, scope="local")
        for t in T.unroll(mr * nr):
            for lane in T.vectorized(lanes):
                acc[t * lanes + lane] = T.cast(0, dtype)
        for ko in range(kv):
            if ahead > 0:  # one cache line per weight row, `ahead` rows further on
                for j in T.unroll(nr):
                    T.evaluate(T.call_llvm_intrin(
                        "void", "llvm.prefetch.p0", T.address_of(wb[n0 + j + ahead, ko * lanes]),
                        T.uint32(0), T.uint32(3), T.uint32(1)))
            for i in T.unroll(mr):
                for j in T.unroll(nr):
                    for lane in T.vectorized(lanes):
                        acc[(i * nr + j) * lanes + lane] += (
                            xb[m0 + i, ko * lanes + lane] * wb[n0 + j, ko * lanes + lane])
        for kk in range(kt):
            for i in T.unroll(mr):
                for j in T.unroll(nr):
                    acc[(i * nr + j) * lanes] += xb[m0 + i, kv * lanes + kk] * wb[n0 + j,
                                                                                  kv * lanes + kk]
        for i in T.unroll(mr):
            for j in T.unroll(nr):
                # tree reduction: log2(lanes) vector adds rather than `lanes` scalar ones
                if lanes >= 64:
                    halve(acc, (i * nr + j) * lanes, 32)
                if lanes >= 32:
                    halve(acc, (i * nr + j) * lanes, 16)
                if lanes >= 16:
                    halve(acc, (i * nr + j) * lanes, 8)
                if lanes >= 8:
                    halve(acc, (i * nr + j) * lanes, 4)
                if lanes >= 4:
                    halve(acc, (i * nr + j) * lanes, 2)
                if bias:
                    yb[m0 + i, n0 + j] = (acc[(i * nr + j) * lanes] +
                                          acc[(i * nr + j) * lanes + 1] + bb[n0 + j])
                else:
                    yb[m0 + i, n0 + j] = acc[(i * nr + j) * lanes] + acc[(i * nr + j) * lanes + 1]

    return micro


def _with_bias(n: int, k: int, dtype: str, tiles) -> tirx.PrimFunc:
    @T.prim_func(private=True)
    def linear_bias(x_h: T.handle, w: T.Buffer((n, k), dtype), b: T.Buffer((n,), dtype),
                    y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), dtype)
        tiles(x, w, b, y, m)

    return linear_bias
