"""Decode GEMV for CUDA: y[m, n] = x[m, :] . w[n, :] (+ residual[m, n]), hand-scheduled TIR;
optionally with the RMS norm of x fused in front (x * rsqrt(mean(x^2) + eps) * gamma).

Decode reads every weight once per token, so this kernel is a weight stream: one warp per output
row, each lane loading 16 bytes of the row per step (a warp reads 512 contiguous bytes), all of
a row's loads unrolled so they are in flight together; float32 accumulation, a butterfly of warp
shuffles for the row sum. That is the kernel for m = 1 row (one sequence); for m > 1 (batched
decode) each PrimFunc branches on the host to kernels/gemv_rows.py's, which read each weight once
for all rows, bitwise the same per row. The optional residual is added in the epilogue (saves
the separate Add kernel).
With `norm_eps`, each warp also sums x^2 over the row it streams anyway and scales its dot
product of x * gamma with the row by rsqrt(mean + eps): the norm kernel and its output vanish.
With `pdl` (kiln.codegen.cuda.kernels.pdl), a kernel issues its first weight loads before it
waits for the kernel before it, and lets the next one start right after.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import gemv_mma as GM
from kiln.codegen.cuda.kernels import gemv_rows as GR
from kiln.codegen.cuda.kernels import pdl as P

WARPS = 4  # rows per block
CHUNK = 8  # 16-byte weight loads in flight per lane


def split_default(k: int, dtype: str, warps: int = WARPS) -> bool:
    """Whether the block's warps share one row: long rows (at least 4 loads per lane in
    each warp's share of k, the share a whole number of warp-wide loads)."""
    step = warps * 32 * _vec(dtype, k)
    return k % step == 0 and k // step >= 4


def _vec(dtype: str, k: int) -> int:
    vec = 16 // {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]
    while k % vec:
        vec //= 2
    return vec


@functools.cache
def gemv_kernel(n: int, k: int, dtype: str, out_dtype: str, *, residual: bool = False,
                norm_eps: float | None = None, pdl: bool = False, warps: int = WARPS,
                chunk: int = CHUNK, split: bool | None = None) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], (gamma[k],) w[n, k], (res[m, n],) y[m, n]): `warps` rows per block
    (or, `split`, the block's warps sharing one row; None: split_default), `chunk` 16-byte
    loads in flight per lane."""
    if norm_eps is not None:
        if residual:
            raise ValueError("gemv: a fused norm and a fused residual together are not needed")
        return _norm_gemv(n, k, dtype, out_dtype, norm_eps, pdl, warps, chunk)
    if split is None:
        split = split_default(k, dtype, warps)
    if split:
        return _splitk_gemv(n, k, dtype, out_dtype, residual, pdl, warps, chunk)
    vec, f32 = _vec(dtype, k), "float32"
    step = 32 * vec  # elements a warp covers per load
    full, tail = k // step, k % step
    chunks = (full + chunk - 1) // chunk

    @T.macro
    def row_dot(x, w, acc, xv, wv, mi, row, tx):
        acc[0] = T.float32(0)
        for ch in range(chunks):
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    for v in T.vectorized(vec):
                        wv[it * vec + v] = w[row, (ch * chunk + it) * step + tx * vec + v]
            if ch == 0:
                P.wait(pdl)
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    for v in T.vectorized(vec):
                        xv[v] = x[mi, (ch * chunk + it) * step + tx * vec + v]
                    for v in T.unroll(vec):
                        acc[0] += T.Cast(f32, xv[v]) * T.Cast(f32, wv[it * vec + v])
        if tail != 0:
            if full == 0:
                P.wait(pdl)
            if full * step + tx * vec < k:
                for v in T.vectorized(vec):
                    xv[v] = x[mi, full * step + tx * vec + v]
                for v in T.unroll(vec):
                    acc[0] += T.Cast(f32, xv[v]) * T.Cast(f32, w[row, full * step + tx * vec + v])
        mask = T.uint32(0xFFFFFFFF)  # the row guard is warp-uniform: all lanes are here
        for off in T.unroll(5):
            acc[0] = acc[0] + T.tvm_warp_shuffle_down(mask, acc[0], 16 >> off, 32, 32)

    nregs = chunk * vec
    tc = GM.mma_rows("residual" if residual else "plain", n, k, dtype, out_dtype,
                     pdl=pdl) if GM.mma_warps(k, dtype) else None
    rows_any = GR.row_dispatch(tc, [GR.gemv_rows(n, k, dtype, out_dtype, vec, residual, None,
                                                 pdl, warps, r) for r in GR.ROW_BUCKETS])

    if residual:

        @T.macro
        def one_gemv_residual(x, w, r, y, m):
            for bx in T.thread_binding((n + warps - 1) // warps, thread="blockIdx.x"):
                for ty in T.thread_binding(warps, thread="threadIdx.y"):
                    for tx in T.thread_binding(32, thread="threadIdx.x"):
                        acc = T.decl_buffer((1,), f32, scope="local")
                        xv = T.decl_buffer((vec,), dtype, scope="local")
                        wv = T.decl_buffer((nregs,), dtype, scope="local")
                        for mi in range(m):
                            if bx * warps + ty < n:
                                row_dot(x, w, acc, xv, wv, mi, bx * warps + ty, tx)
                                if tx == 0:
                                    y[mi, bx * warps + ty] = T.Cast(
                                        out_dtype, acc[0] + T.Cast(f32, r[mi, bx * warps + ty]))

        @T.prim_func(private=True)
        def gemv_residual(x_h: T.handle, w: T.Buffer((n, k), dtype), r_h: T.handle,
                          y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            r = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n), out_dtype)
            if m == 1:
                one_gemv_residual(x, w, r, y, m)
            else:
                rows_any(x, None, w, r, y, m)

        return gemv_residual

    @T.macro
    def one_gemv(x, w, y, m):
        for bx in T.thread_binding((n + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((1,), f32, scope="local")
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    wv = T.decl_buffer((nregs,), dtype, scope="local")
                    for mi in range(m):
                        if bx * warps + ty < n:
                            row_dot(x, w, acc, xv, wv, mi, bx * warps + ty, tx)
                            if tx == 0:
                                y[mi, bx * warps + ty] = T.Cast(out_dtype, acc[0])

    @T.prim_func(private=True)
    def gemv(x_h: T.handle, w: T.Buffer((n, k), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), out_dtype)
        if m == 1:
            one_gemv(x, w, y, m)
        else:
            rows_any(x, None, w, None, y, m)

    return gemv


@functools.cache
def _norm_gemv(n: int, k: int, dtype: str, out_dtype: str, eps: float,
               pdl: bool, warps: int, chunk: int) -> tirx.PrimFunc:
    vec, f32 = _vec(dtype, k), "float32"
    step = 32 * vec
    full, tail = k // step, k % step
    chunks = (full + chunk - 1) // chunk

    @T.macro
    def fma(acc, xv, gv, wval, v):
        acc[0] += T.Cast(f32, xv[v]) * T.Cast(f32, gv[v]) * wval
        acc[1] += T.Cast(f32, xv[v]) * T.Cast(f32, xv[v])

    tc = GM.mma_rows("norm", n, k, dtype, out_dtype, eps=eps, pdl=pdl) if GM.mma_warps(
        k, dtype) else None
    rows_any = GR.row_dispatch(tc, [GR.gemv_rows(n, k, dtype, out_dtype, vec, False, eps, pdl,
                                                 warps, r) for r in GR.ROW_BUCKETS])

    @T.macro
    def one_norm_gemv(x, gamma, w, y, m):
        for bx in T.thread_binding((n + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((2,), f32, scope="local")  # dot, sum of squares
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wv = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for mi in range(m):
                        if bx * warps + ty < n:
                            acc[0] = T.float32(0)
                            acc[1] = T.float32(0)
                            for ch in range(chunks):
                                for it in T.unroll(chunk):
                                    if ch * chunk + it < full:
                                        for v in T.vectorized(vec):
                                            wv[it * vec + v] = w[bx * warps + ty, (
                                                ch * chunk + it) * step + tx * vec + v]
                                if ch == 0:
                                    P.wait(pdl)
                                for it in T.unroll(chunk):
                                    if ch * chunk + it < full:
                                        for v in T.vectorized(vec):
                                            xv[v] = x[mi, (ch * chunk + it) * step + tx * vec + v]
                                        for v in T.vectorized(vec):
                                            gv[v] = gamma[(ch * chunk + it) * step + tx * vec + v]
                                        for v in T.unroll(vec):
                                            fma(acc, xv, gv, T.Cast(f32, wv[it * vec + v]), v)
                            if tail != 0:
                                if full == 0:
                                    P.wait(pdl)
                                if full * step + tx * vec < k:
                                    for v in T.vectorized(vec):
                                        xv[v] = x[mi, full * step + tx * vec + v]
                                    for v in T.vectorized(vec):
                                        gv[v] = gamma[full * step + tx * vec + v]
                                    for v in T.unroll(vec):
                                        fma(acc, xv, gv, T.Cast(f32, w[
                                            bx * warps + ty, full * step + tx * vec + v]), v)
                            for off in T.unroll(5):
                                for r in T.unroll(2):
                                    acc[r] = acc[r] + T.tvm_warp_shuffle_down(
                                        T.uint32(0xFFFFFFFF), acc[r], 16 >> off, 32, 32)
                            if tx == 0:
                                y[mi, bx * warps + ty] = T.Cast(out_dtype, acc[0] * T.rsqrt(
                                    acc[1] / T.float32(k) + T.float32(eps)))

    @T.prim_func(private=True)
    def norm_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype), w: T.Buffer((n, k), dtype),
                  y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), out_dtype)
        if m == 1:
            one_norm_gemv(x, gamma, w, y, m)
        else:
            rows_any(x, gamma, w, None, y, m)
    return norm_gemv


@functools.cache
def _splitk_gemv(n: int, k: int, dtype: str, out_dtype: str, residual: bool,
                 pdl: bool, warps: int, chunk: int) -> tirx.PrimFunc:
    """Long rows: the block's warps share one row, each a 1/warps of k, partial sums added
    through shared memory: `warps` times the warps in flight."""
    vec, f32 = _vec(dtype, k), "float32"
    step = 32 * vec
    part = k // warps  # elements per warp
    full = part // step
    chunks = (full + chunk - 1) // chunk

    @T.macro
    def body(x, w, r, y, m):
        for bx in T.thread_binding(n, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    red = T.decl_buffer((warps,), f32, scope="shared")
                    acc = T.decl_buffer((1,), f32, scope="local")
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    wv = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for mi in range(m):
                        acc[0] = T.float32(0)
                        for ch in range(chunks):
                            for it in T.unroll(chunk):
                                if ch * chunk + it < full:
                                    for v in T.vectorized(vec):
                                        wv[it * vec + v] = w[bx, ty * part + (
                                            ch * chunk + it) * step + tx * vec + v]
                            if ch == 0:
                                P.wait(pdl)
                            for it in T.unroll(chunk):
                                if ch * chunk + it < full:
                                    for v in T.vectorized(vec):
                                        xv[v] = x[mi, ty * part + (ch * chunk + it) * step
                                                  + tx * vec + v]
                                    for v in T.unroll(vec):
                                        acc[0] += T.Cast(f32, xv[v]) * T.Cast(
                                            f32, wv[it * vec + v])
                        for off in T.unroll(5):
                            acc[0] = acc[0] + T.tvm_warp_shuffle_down(
                                T.uint32(0xFFFFFFFF), acc[0], 16 >> off, 32, 32)
                        if tx == 0:
                            red[ty] = acc[0]
                        T.tvm_storage_sync("shared")
                        if ty == 0 and tx == 0:
                            for t in range(1, warps):
                                acc[0] += red[t]
                            if residual:
                                y[mi, bx] = T.Cast(out_dtype, acc[0] + T.Cast(f32, r[mi, bx]))
                            else:
                                y[mi, bx] = T.Cast(out_dtype, acc[0])
                        T.tvm_storage_sync("shared")

    tc = GM.mma_rows("residual" if residual else "plain", n, k, dtype, out_dtype,
                     pdl=pdl) if GM.mma_warps(k, dtype) else None
    rows_any = GR.row_dispatch(tc, [GR.splitk_rows(n, k, dtype, out_dtype, vec, residual, pdl,
                                                   warps, r) for r in GR.ROW_BUCKETS])

    if residual:

        @T.prim_func(private=True)
        def splitk_gemv_residual(x_h: T.handle, w: T.Buffer((n, k), dtype), r_h: T.handle,
                                 y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            r = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n), out_dtype)
            if m == 1:
                body(x, w, r, y, m)
            else:
                rows_any(x, None, w, r, y, m)

        return splitk_gemv_residual

    @T.prim_func(private=True)
    def splitk_gemv(x_h: T.handle, w: T.Buffer((n, k), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), out_dtype)
        if m == 1:
            body(x, w, None, y, m)
        else:
            rows_any(x, None, w, None, y, m)

    return splitk_gemv


def _pair_norm_dot(k: int, dtype: str, pdl: bool, chunk: int):
    """A macro: with x' = x * gamma, acc[0] = x' . w[ra], acc[1] = x' . w[rb] and
    acc[2] = sum(x^2), over row `mi` of x, summed across the warp (lane 0 holds them). The two
    weight rows stream together, their first chunk issued before the PDL wait."""
    vec, f32 = _vec(dtype, k), "float32"
    step = 32 * vec
    full, tail = k // step, k % step
    chunks = (full + chunk - 1) // chunk

    @T.macro
    def fma(acc, xv, gv, wa, wb, v):
        acc[0] += T.Cast(f32, xv[v]) * T.Cast(f32, gv[v]) * wa
        acc[1] += T.Cast(f32, xv[v]) * T.Cast(f32, gv[v]) * wb
        acc[2] += T.Cast(f32, xv[v]) * T.Cast(f32, xv[v])

    @T.macro
    def pair_dot(x, gamma, w, acc, xv, gv, wa, wb, mi, ra, rb, tx):
        acc[0] = T.float32(0)
        acc[1] = T.float32(0)
        acc[2] = T.float32(0)
        for ch in range(chunks):
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    for v in T.vectorized(vec):
                        wa[it * vec + v] = w[ra, (ch * chunk + it) * step + tx * vec + v]
                    for v in T.vectorized(vec):
                        wb[it * vec + v] = w[rb, (ch * chunk + it) * step + tx * vec + v]
            if ch == 0:
                P.wait(pdl)
            for it in T.unroll(chunk):
                if ch * chunk + it < full:
                    for v in T.vectorized(vec):
                        xv[v] = x[mi, (ch * chunk + it) * step + tx * vec + v]
                    for v in T.vectorized(vec):
                        gv[v] = gamma[(ch * chunk + it) * step + tx * vec + v]
                    for v in T.unroll(vec):
                        fma(acc, xv, gv, T.Cast(f32, wa[it * vec + v]),
                            T.Cast(f32, wb[it * vec + v]), v)
        if tail != 0:
            if full == 0:
                P.wait(pdl)
            if full * step + tx * vec < k:
                for v in T.vectorized(vec):
                    xv[v] = x[mi, full * step + tx * vec + v]
                for v in T.vectorized(vec):
                    gv[v] = gamma[full * step + tx * vec + v]
                for v in T.unroll(vec):
                    fma(acc, xv, gv, T.Cast(f32, w[ra, full * step + tx * vec + v]),
                        T.Cast(f32, w[rb, full * step + tx * vec + v]), v)
        for off in T.unroll(5):
            for r in T.unroll(3):
                acc[r] = acc[r] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[r],
                                                          16 >> off, 32, 32)

    return pair_dot, vec


@functools.cache
def swiglu_gemv_kernel(f: int, k: int, dtype: str, eps: float, *, pdl: bool = False,
                       warps: int = WARPS, chunk: int = CHUNK) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], gamma[k], w[2f, k], y[m, f]): with x' = rmsnorm(x) * gamma,
    g = x' . w[r], u = x' . w[f + r], y[m, r] = silu(g) * u. The gate/up projection, the
    split of its output and the SwiGLU in one kernel: one warp per output, two weight rows."""
    pair_dot, vec = _pair_norm_dot(k, dtype, pdl, chunk)
    f32 = "float32"

    tc = GM.mma_rows("swiglu", 2 * f, k, dtype, dtype, eps=eps, pdl=pdl, f=f) if (
        GM.mma_warps(k, dtype)) else None
    rows_any = GR.row_dispatch(tc, [GR.swiglu_rows(f, k, dtype, vec, eps, pdl, warps, r)
                                    for r in GR.ROW_BUCKETS])

    @T.macro
    def one_swiglu_gemv(x, gamma, w, y, m):
        for bx in T.thread_binding((f + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((3,), f32, scope="local")  # gate, up, sum of squares
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wg = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    wu = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    for mi in range(m):
                        if bx * warps + ty < f:
                            pair_dot(x, gamma, w, acc, xv, gv, wg, wu, mi, bx * warps + ty,
                                     f + bx * warps + ty, tx)
                            if tx == 0:
                                acc[2] = T.rsqrt(acc[2] / T.float32(k) + T.float32(eps))
                                acc[0] = acc[0] * acc[2]
                                y[mi, bx * warps + ty] = T.Cast(dtype, acc[0] / (
                                    T.float32(1) + T.exp(-acc[0])) * acc[1] * acc[2])


    @T.prim_func(private=True)
    def swiglu_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype),
                    w: T.Buffer((2 * f, k), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, f), dtype)
        if m == 1:
            one_swiglu_gemv(x, gamma, w, y, m)
        else:
            rows_any(x, gamma, w, None, y, m)

    return swiglu_gemv


def rope_store(heads: int, kv_heads: int, head_dim: int, dtype: str):
    """A macro: with acc[0], acc[1] rows c and c + D/2 of one head of the q/k/v projection
    (r0: the first one's row), rotate them (q and k) and write q_out, or the k/v caches at row
    `past`; acc[2] is scratch. Shared by the dense and the sparse q/k/v kernels."""
    d, half, f32 = head_dim, head_dim // 2, "float32"
    hd, kvd = heads * head_dim, kv_heads * head_dim

    @T.macro
    def store_pair(acc, cos, sin, kc, vc, pst, q, mi, c, r0):
        ci: T.let[T.int64] = T.min(mi, cos.shape[0] - 1)
        # the row's cached length: pst holds one per row, or one for all (a single past)
        row: T.let[T.int64] = T.Cast("int64", pst[T.min(mi, pst.shape[0] - 1)])
        if r0 < hd + kvd:  # q or k: rotated
            acc[2] = acc[0] * T.Cast(f32, cos[ci, 0, c]) - acc[1] * T.Cast(f32, sin[ci, 0, c])
            acc[1] = acc[1] * T.Cast(f32, cos[ci, 0, c + half]) + acc[0] * T.Cast(
                f32, sin[ci, 0, c + half])
            acc[0] = acc[2]
        if r0 < hd:
            q[mi, r0] = T.Cast(dtype, acc[0])
            q[mi, r0 + half] = T.Cast(dtype, acc[1])
        elif r0 < hd + kvd:
            kc[mi, (r0 - hd) // d, row, c] = T.Cast(dtype, acc[0])
            kc[mi, (r0 - hd) // d, row, c + half] = T.Cast(dtype, acc[1])
        else:
            vc[mi, (r0 - hd - kvd) // d, row, c] = T.Cast(dtype, acc[0])
            vc[mi, (r0 - hd - kvd) // d, row, c + half] = T.Cast(dtype, acc[1])

    return store_pair


@functools.cache
def qkv_rope_gemv_kernel(heads: int, kv_heads: int, head_dim: int, k: int, dtype: str,
                         eps: float, *, pdl: bool = False, warps: int = WARPS,
                         chunk: int = CHUNK) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], gamma[k], w[(H + 2 KV) D, k], cos[cb, 1, D], sin[cb, 1, D],
    k_cache, v_cache, past[1 or m], q_out[m, H D]): decode's whole attention input in one
    kernel: the rms norm, the q/k/v projection, rotary position embedding (full width, halves
    rotated: x[c] with x[c + D/2]) on q and k, and k/v written into the caches at row `past`
    (of each row: past[i], or past[0] for all).

    Each warp computes the two rows a rotation pairs (c and c + D/2 of one head), so the
    rotation needs nothing from another warp; v rows are paired the same way and not
    rotated. The q/k/v output never reaches memory (it is what kiln.codegen.cuda.lower
    otherwise splits, rotates and appends in qkv_rotary_append_kernel)."""
    d, half, f32 = head_dim, head_dim // 2, "float32"
    n, hd = (heads + 2 * kv_heads) * head_dim, heads * head_dim
    pairs = n // 2
    pair_dot, vec = _pair_norm_dot(k, dtype, pdl, chunk)
    store_pair = rope_store(heads, kv_heads, head_dim, dtype)

    rows4, rows8, rows16 = (GR.qkv_rope_rows(pairs, half, d, k, dtype, vec, eps, pdl, warps, r,
                                             store_pair) for r in GR.ROW_BUCKETS)

    tc = GM.mma_rows("qkv", n, k, dtype, dtype, eps=eps, pdl=pdl, pairs=pairs, half=half,
                     d=d, store_pair=store_pair) if GM.mma_warps(k, dtype) else None

    @T.macro
    def rows_any(x, gamma, w, cos, sin, kc, vc, pst, q, m):
        if tc is not None:
            tc(x, gamma, w, None, q, m, cos, sin, kc, vc, pst)
        elif m <= GR.ROW_BUCKETS[0]:
            rows4(x, gamma, w, cos, sin, kc, vc, pst, q, m)
        elif m <= GR.ROW_BUCKETS[1]:
            rows8(x, gamma, w, cos, sin, kc, vc, pst, q, m)
        else:
            rows16(x, gamma, w, cos, sin, kc, vc, pst, q, m)

    @T.macro
    def one_qkv_rope_gemv(x, gamma, w, cos, sin, kc, vc, pst, q, m):
        for bx in T.thread_binding((pairs + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((3,), f32, scope="local")  # row c, row c + D/2, x^2
                    xv = T.decl_buffer((vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    wa = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    wb = T.decl_buffer((chunk * vec,), dtype, scope="local")
                    pi: T.let[T.int32] = bx * warps + ty  # pair: head pi // half, dim c
                    c: T.let[T.int32] = pi % half
                    r0: T.let[T.int32] = pi // half * d + c  # its two rows of w
                    for mi in range(m):
                        if pi < pairs:
                            pair_dot(x, gamma, w, acc, xv, gv, wa, wb, mi, r0, r0 + half, tx)
                            if tx == 0:
                                acc[2] = T.rsqrt(acc[2] / T.float32(k) + T.float32(eps))
                                # rounded to the storage dtype, as the unfused q/k/v output is
                                acc[0] = T.Cast(f32, T.Cast(dtype, acc[0] * acc[2]))
                                acc[1] = T.Cast(f32, T.Cast(dtype, acc[1] * acc[2]))
                                store_pair(acc, cos, sin, kc, vc, pst, q, mi, c, r0)


    @T.prim_func(private=True)
    def qkv_rope_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype), w: T.Buffer((n, k), dtype),
                      cos_h: T.handle, sin_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                      pst_h: T.handle, q_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m, cb, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")  # cached length: one per row, or one
        x = T.match_buffer(x_h, (m, k), dtype)
        cos = T.match_buffer(cos_h, (cb, 1, d), dtype)
        sin = T.match_buffer(sin_h, (cb, 1, d), dtype)
        kc = T.match_buffer(kc_h, (m, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (m, kv_heads, cap, d), dtype)
        q = T.match_buffer(q_h, (m, hd), dtype)
        if m == 1:
            one_qkv_rope_gemv(x, gamma, w, cos, sin, kc, vc, pst, q, m)
        else:
            rows_any(x, gamma, w, cos, sin, kc, vc, pst, q, m)

    return qkv_rope_gemv


@functools.cache
def argmax_kernel(v: int, dtype: str, *, pdl: bool = False) -> tirx.PrimFunc:
    """PrimFunc(logits[m, v], ids[m] int64): the greedy token of each row, on the device (one
    block of 1024 threads per row; ties go to the lowest index, as numpy's argmax)."""
    threads, f32, UNROLL = 1024, "float32", 8
    per = (v + threads - 1) // threads

    @T.prim_func(private=True)
    def argmax(x_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, v), dtype)
        o = T.match_buffer(o_h, (m,), "int64")
        for bx in T.thread_binding(m, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                P.wait(pdl)
                bv = T.decl_buffer((threads,), f32, scope="shared")
                bi = T.decl_buffer((threads,), "int32", scope="shared")
                best = T.decl_buffer((1,), f32, scope="local")
                idx = T.decl_buffer((1,), "int32", scope="local")
                vals = T.decl_buffer((UNROLL,), f32, scope="local")
                cur = T.decl_buffer((1,), f32, scope="local")
                at = T.decl_buffer((1,), "int32", scope="local")
                best[0] = T.float32(-3.4028234663852886e38)
                idx[0] = 0
                for i0 in range((per + UNROLL - 1) // UNROLL):  # strided: coalesced
                    for u in T.unroll(UNROLL):  # UNROLL loads in flight, then compare
                        vals[u] = T.if_then_else(
                            (i0 * UNROLL + u) * threads + tx < v,
                            T.Cast(f32, x[bx, T.min((i0 * UNROLL + u) * threads + tx, v - 1)]),
                            T.float32(-3.4028234663852886e38))
                    for u in T.unroll(UNROLL):  # ascending: ties keep the lowest index
                        if vals[u] > best[0]:
                            best[0] = vals[u]
                            idx[0] = (i0 * UNROLL + u) * threads + tx
                bv[tx] = best[0]
                bi[tx] = idx[0]
                T.tvm_storage_sync("shared")
                for lvl in T.unroll(10):
                    # read all, barrier, then write: TIR's sync planner refuses shared loads
                    # in a branch condition and a barrier inside a branch
                    if tx < (threads >> (lvl + 1)):
                        best[0] = bv[tx + (threads >> (lvl + 1))]
                        idx[0] = bi[tx + (threads >> (lvl + 1))]
                        cur[0] = bv[tx]
                        at[0] = bi[tx]
                    T.tvm_storage_sync("shared")
                    if tx < (threads >> (lvl + 1)) and (best[0] > cur[0] or (
                            best[0] == cur[0] and idx[0] < at[0])):
                        bv[tx] = best[0]
                        bi[tx] = idx[0]
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    o[bx] = T.Cast("int64", bi[0])

    return argmax
