"""Decode GEMVs for several batch rows at once: each weight is read once for all rows.

kernels/gemv.py streams each weight row through one warp; for m = 1 that is the whole story. With
m > 1 rows (batched decode) its loop over the rows would stream every weight m times, so the
kernels here keep `rows` (a compile-time bucket: 4, 8 or 16) float32 accumulators per lane: a
chunk of weights is loaded once into registers, then every row's x is multiplied into it. Rows
beyond m are guarded off (uniform branches); m > rows loops over groups of `rows` rows.

The same lane order of products and the same shuffle tree as the one-row kernels, so every row's
result is bitwise that of the one-row kernel. gemv.py's PrimFuncs branch on m on the host (m = 1:
their own one-row kernel, unchanged; else kernels/gemv_mma.py's tensor-core kernel where it
applies, or the bucket here that holds m): each branch is its own device kernel, with its own
registers.
"""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import pdl as P

#: row buckets of the batched kernels (m = 1 keeps the one-row kernel)
ROW_BUCKETS = (4, 8, 16)
#: 16-byte weight loads in flight per lane: fewer than the one-row kernels' (registers go to
#: the accumulators; with several rows there is more arithmetic per load to hide latency)
CHUNK = 4


def row_dispatch(tc, rows):
    """A macro(x, gamma, w, r, y, m) running a GEMV's m > 1 rows: the tensor-core kernel
    `tc` (kernels/gemv_mma.py) where there is one, else the CUDA-core kernel of the bucket
    holding m (`rows`: one macro(x, gamma, w, r, y, m) per ROW_BUCKETS entry)."""
    rows4, rows8, rows16 = rows

    @T.macro
    def dispatch(x, gamma, w, r, y, m):
        if tc is not None:
            tc(x, gamma, w, r, y, m, None, None, None, None, None)
        elif m <= ROW_BUCKETS[0]:
            rows4(x, gamma, w, r, y, m)
        elif m <= ROW_BUCKETS[1]:
            rows8(x, gamma, w, r, y, m)
        else:
            rows16(x, gamma, w, r, y, m)

    return dispatch


def bucket_rows(m: int) -> int:
    """The bucket the kernels use for m > 1 rows (the largest for m beyond it)."""
    return next((r for r in ROW_BUCKETS if m <= r), ROW_BUCKETS[-1])


def rows_dot(k: int, dtype: str, vec: int, pdl: bool, rows: int, *, pair: bool = False,
             norm: bool = False, part: int = 0, chunk: int = CHUNK):
    """A macro: for the rows r0 .. r0 + rows - 1 of x (those < m), acc[i] = x'[r0 + i] . w[ra]
    and, with `pair`, acc[rows + i] = x'[r0 + i] . w[rb]; with `norm`, x' = x * gamma and
    acc[(1 + pair) rows + i] = sum(x[r0 + i]^2); summed across the warp (lane 0 holds them).
    `part` > 0: over the `part` elements from `base` only (split-K), else the whole row."""
    f32 = "float32"
    step = 32 * vec
    span = part or k
    full, tail = span // step, span % step
    chunks = (full + chunk - 1) // chunk
    nacc = rows * (1 + pair + norm)
    sq = rows * (1 + pair)

    @T.macro
    def fma(acc, xv, gv, wa, wb, i, v):
        if norm:
            acc[i] += T.Cast(f32, xv[v]) * T.Cast(f32, gv[v]) * wa
            if pair:
                acc[rows + i] += T.Cast(f32, xv[v]) * T.Cast(f32, gv[v]) * wb
            acc[sq + i] += T.Cast(f32, xv[v]) * T.Cast(f32, xv[v])
        else:
            acc[i] += T.Cast(f32, xv[v]) * wa

    @T.macro
    def dot(x, gamma, w, acc, xv, gv, wa, wb, r0, m, ra, rb, tx, base):
        for i in T.unroll(nacc):
            acc[i] = T.float32(0)
        for ch in range(chunks):
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    for v in T.vectorized(vec):
                        wa[it * vec + v] = w[ra, base + (ch * chunk + it) * step + tx * vec + v]
                    if pair:
                        for v in T.vectorized(vec):
                            wb[it * vec + v] = w[rb, base + (ch * chunk + it) * step
                                                 + tx * vec + v]
            if ch == 0:
                P.wait(pdl)
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    if norm:
                        for v in T.vectorized(vec):
                            gv[v] = gamma[base + (ch * chunk + it) * step + tx * vec + v]
                    for i in T.unroll(rows):
                        if r0 + i < m:
                            for v in T.vectorized(vec):
                                xv[v] = x[r0 + i, base + (ch * chunk + it) * step + tx * vec + v]
                            for v in T.unroll(vec):
                                fma(acc, xv, gv, T.Cast(f32, wa[it * vec + v]),
                                    T.Cast(f32, wb[it * vec + v]), i, v)
        if tail != 0:
            if full == 0:
                P.wait(pdl)
            if full * step + tx * vec < span:
                if norm:
                    for v in T.vectorized(vec):
                        gv[v] = gamma[base + full * step + tx * vec + v]
                for v in T.vectorized(vec):
                    wa[v] = w[ra, base + full * step + tx * vec + v]
                if pair:
                    for v in T.vectorized(vec):
                        wb[v] = w[rb, base + full * step + tx * vec + v]
                for i in T.unroll(rows):
                    if r0 + i < m:
                        for v in T.vectorized(vec):
                            xv[v] = x[r0 + i, base + full * step + tx * vec + v]
                        for v in T.unroll(vec):
                            fma(acc, xv, gv, T.Cast(f32, wa[v]), T.Cast(f32, wb[v]), i, v)
        for off in T.unroll(5):
            for i in T.unroll(nacc):
                acc[i] = acc[i] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[i],
                                                          16 >> off, 32, 32)

    return dot, nacc


def gemv_rows(n: int, k: int, dtype: str, out_dtype: str, vec: int, residual: bool,
              norm_eps: float | None, pdl: bool, warps: int, rows: int):
    """A macro(x, gamma, w, r, y, m): gemv.py's plain/residual/norm GEMV for m rows, `rows`
    at a time; one warp per output row."""
    f32, chunk = "float32", CHUNK
    norm = norm_eps is not None
    dot, nacc = rows_dot(k, dtype, vec, pdl, rows, norm=norm, chunk=chunk)

    @T.macro
    def body(x, gamma, w, r, y, m):
        for bx in T.thread_binding((n + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((nacc,), f32, scope="local")
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wa = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for rg in range((m + rows - 1) // rows):
                        if bx * warps + ty < n:
                            dot(x, gamma, w, acc, xv, gv, wa, wa, rg * rows, m, bx * warps + ty,
                                bx * warps + ty, tx, 0)
                            if tx == 0:
                                for i in T.unroll(rows):
                                    if rg * rows + i < m:
                                        if norm:
                                            y[rg * rows + i, bx * warps + ty] = T.Cast(
                                                out_dtype, acc[i] * T.rsqrt(
                                                    acc[rows + i] / T.float32(k)
                                                    + T.float32(norm_eps)))
                                        elif residual:
                                            y[rg * rows + i, bx * warps + ty] = T.Cast(
                                                out_dtype, acc[i] + T.Cast(
                                                    f32, r[rg * rows + i, bx * warps + ty]))
                                        else:
                                            y[rg * rows + i, bx * warps + ty] = T.Cast(
                                                out_dtype, acc[i])

    return body


def splitk_rows(n: int, k: int, dtype: str, out_dtype: str, vec: int, residual: bool,
                pdl: bool, warps: int, rows: int):
    """A macro(x, gamma, w, r, y, m), gamma unused: gemv.py's split-K GEMV (the block's warps
    share one row, each a 1/warps of k, partial sums added in shared memory) for m rows, `rows`
    at a time."""
    f32, chunk = "float32", CHUNK
    part = k // warps
    dot, nacc = rows_dot(k, dtype, vec, pdl, rows, part=part, chunk=chunk)

    @T.macro
    def body(x, gamma, w, r, y, m):
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    red = T.decl_buffer((warps * rows,), f32, scope="shared")
                    acc = T.decl_buffer((nacc,), f32, scope="local")
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    wa = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for rg in range((m + rows - 1) // rows):
                        dot(x, None, w, acc, xv, xv, wa, wa, rg * rows, m, bx, bx, tx, ty * part)
                        if tx == 0:
                            for i in T.unroll(rows):
                                red[ty * rows + i] = acc[i]
                        T.tvm_storage_sync("shared")
                        if ty == 0 and tx == 0:
                            for i in T.unroll(rows):
                                if rg * rows + i < m:
                                    for t in range(1, warps):
                                        acc[i] += red[t * rows + i]
                                    if residual:
                                        y[rg * rows + i, bx] = T.Cast(out_dtype, acc[i] + T.Cast(
                                            f32, r[rg * rows + i, bx]))
                                    else:
                                        y[rg * rows + i, bx] = T.Cast(out_dtype, acc[i])
                        T.tvm_storage_sync("shared")

    return body


def swiglu_rows(f: int, k: int, dtype: str, vec: int, eps: float, pdl: bool, warps: int,
                rows: int):
    """A macro(x, gamma, w, r, y, m), r unused: gemv.py's SwiGLU GEMV for m rows, `rows` at
    a time."""
    f32, chunk = "float32", CHUNK
    dot, nacc = rows_dot(k, dtype, vec, pdl, rows, pair=True, norm=True, chunk=chunk)

    @T.macro
    def body(x, gamma, w, r, y, m):
        for bx in T.thread_binding((f + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((nacc,), f32, scope="local")  # gate, up, x^2 per row
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wg = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    wu = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for rg in range((m + rows - 1) // rows):
                        if bx * warps + ty < f:
                            dot(x, gamma, w, acc, xv, gv, wg, wu, rg * rows, m, bx * warps + ty,
                                f + bx * warps + ty, tx, 0)
                            if tx == 0:
                                for i in T.unroll(rows):
                                    if rg * rows + i < m:
                                        acc[2 * rows + i] = T.rsqrt(
                                            acc[2 * rows + i] / T.float32(k) + T.float32(eps))
                                        acc[i] = acc[i] * acc[2 * rows + i]
                                        y[rg * rows + i, bx * warps + ty] = T.Cast(
                                            dtype, acc[i] / (T.float32(1) + T.exp(-acc[i]))
                                            * acc[rows + i] * acc[2 * rows + i])

    return body


def qkv_rope_rows(pairs: int, half: int, d: int, k: int, dtype: str, vec: int, eps: float,
                  pdl: bool, warps: int, rows: int, store_pair):
    """A macro(x, gamma, w, cos, sin, kc, vc, pst, q, m): gemv.py's fused q/k/v + rotary + KV
    append GEMV for m rows, `rows` at a time (`store_pair`: gemv.rope_store's macro, which
    writes row mi's k/v at that row's cached length)."""
    f32, chunk = "float32", CHUNK
    dot, nacc = rows_dot(k, dtype, vec, pdl, rows, pair=True, norm=True, chunk=chunk)

    @T.macro
    def body(x, gamma, w, cos, sin, kc, vc, pst, q, m):
        for bx in T.thread_binding((pairs + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((nacc,), f32, scope="local")
                    one = T.decl_buffer((3,), f32, scope="local")  # store_pair's row c, c + D/2
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wa = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    wb = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    pi: T.let[T.int32] = bx * warps + ty
                    c: T.let[T.int32] = pi % half
                    r0: T.let[T.int32] = pi // half * d + c
                    for rg in range((m + rows - 1) // rows):
                        if pi < pairs:
                            dot(x, gamma, w, acc, xv, gv, wa, wb, rg * rows, m, r0, r0 + half,
                                tx, 0)
                            if tx == 0:
                                for i in T.unroll(rows):
                                    if rg * rows + i < m:
                                        one[2] = T.rsqrt(acc[2 * rows + i] / T.float32(k)
                                                         + T.float32(eps))
                                        one[0] = T.Cast(f32, T.Cast(dtype, acc[i] * one[2]))
                                        one[1] = T.Cast(f32, T.Cast(dtype, acc[rows + i]
                                                                    * one[2]))
                                        store_pair(one, cos, sin, kc, vc, pst, q,
                                                   T.Cast("int64", rg * rows + i), c, r0)

    return body

