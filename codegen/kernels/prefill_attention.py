"""Prefill attention with query tiles: each task serves `queries` queries of one KV head group.

The rows of a task are (query, head of the GQA group) pairs, R = queries * group of them. Keys
stream in blocks of B = 16 (one SIMD vector): the block of K is transposed once into a local
[D, B] tile, then scores S[R, B] are a small GEMM of broadcast FMAs (no horizontal sums), so each
K/V row is loaded once per R rows instead of once per query. Online softmax per block: the block
max, the rescale of the running sum and output, P = exp(S - max) with masked lanes set to exactly
0 (causal, past the end, or attention mask 0), then O[R, D] += P @ V one D-chunk of B columns at a
time with the R chunk accumulators in registers. The score matrix never exists.
Tasks run in zig-zag order of query tiles so the two halves of a causal prefill cost the same.
Layouts: q/o (batch, seq, heads * D); caches (batch, kv_heads, capacity, D), as in attention.py.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.kernels.attention import F32_MIN, attention_entry
from kiln.codegen.kernels.fastmath import fast_exp

B = 16  # keys per block: one fp32 AVX-512 vector


def tile_queries(heads: int, kv_heads: int, rows: int = 24) -> int:
    """Queries per task so that queries * group rows fill about `rows` accumulator registers."""
    return max(1, rows // (heads // kv_heads))


@functools.cache
def prefill_attention_kernel(heads: int, kv_heads: int, head_dim: int, scale: float, *,
                             queries: int, causal: bool = True, masked: bool = False,
                             dtype: str = "float32", mask_dtype: str = "int64",
                             quantized: bool = False, window: int = 0) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, (k_scale, v_scale,) (mask[b, past+s],) past,
    out[b, s, H*D]); int8 caches with per-row scales when `quantized`."""
    if head_dim % B:
        raise ValueError(f"prefill attention: head_dim {head_dim} is not a multiple of {B}")
    body = _body(heads, kv_heads, head_dim, scale, queries, causal, masked, quantized, window)
    return attention_entry(body, heads, kv_heads, head_dim, dtype=dtype, mask_dtype=mask_dtype,
                           masked=masked, quantized=quantized)


def _body(heads: int, kv_heads: int, d: int, scale: float, qt: int, causal: bool,
          masked: bool, quantized: bool, window: int):
    group = heads // kv_heads
    rows, f32 = qt * group, "float32"

    def _ok(mask, bi, j, qi, kend, past):
        ok = j < kend
        if causal:
            ok = tirx.And(ok, j <= past + qi)
        if window > 0:  # sliding window: the last `window` keys up to the query
            ok = tirx.And(ok, j > past + qi - window)
        if masked:
            ok = tirx.And(ok, mask[bi, T.min(j, kend - 1)] != tirx.const(0, mask.dtype))
        return ok

    @T.macro
    def fold(red, h, is_max):
        for lane in T.vectorized(h):
            if is_max:
                red[lane] = T.max(red[lane], red[lane + h])
            else:
                red[lane] += red[lane + h]

    @T.macro
    def reduce16(red, is_max):
        """red[0] = max or sum of red[0:16], by halving (4 vector steps, no scalar chain)."""
        fold(red, 8, is_max)
        fold(red, 4, is_max)
        fold(red, 2, is_max)
        fold(red, 1, is_max)

    @T.macro
    def softmax_block(sc, st, acc, mask, bi, j0, q0, kend, past):
        """Per row: block max, rescale running sum and output, P = exp(S - max) or 0."""
        red = T.decl_buffer((B,), f32, scope="local")
        for r in range(rows):
            qi: T.let[T.int64] = q0 + r // group
            for lane in T.vectorized(B):
                red[lane] = T.Select(_ok(mask, bi, j0 + lane, qi, kend, past),
                                     sc[r * B + lane], T.float32(F32_MIN))
            reduce16(red, True)
            st[rows * 2] = T.max(st[r], red[0])
            st[rows * 2 + 1] = fast_exp(st[r] - st[rows * 2])  # rescale of the old state
            st[r] = st[rows * 2]
            for lane in T.vectorized(B):
                sc[r * B + lane] = T.Select(_ok(mask, bi, j0 + lane, qi, kend, past),
                                            fast_exp(sc[r * B + lane] - st[r]), T.float32(0))
                red[lane] = sc[r * B + lane]
            reduce16(red, False)
            st[rows + r] = st[rows + r] * st[rows * 2 + 1] + red[0]
            for c in T.vectorized(d):
                acc[r * d + c] = acc[r * d + c] * st[rows * 2 + 1]

    @T.macro
    def scores(qv, kt, sc, kc, ks, bi, g, j0, kend):
        for jj in range(B):  # transpose (and dequantize) the key block once: kt[c, jj]
            if quantized:
                for c in T.vectorized(d):
                    kt[c * B + jj] = T.Cast(f32, kc[bi, g, T.min(j0 + jj, kend - 1), c]) * ks[
                        bi, g, T.min(j0 + jj, kend - 1), 0]
            else:
                for c in T.vectorized(d):
                    kt[c * B + jj] = kc[bi, g, T.min(j0 + jj, kend - 1), c]
        for r in T.unroll(rows):
            for lane in T.vectorized(B):
                sc[r * B + lane] = T.float32(0)
        for c in range(d):
            for r in T.unroll(rows):
                for lane in T.vectorized(B):
                    sc[r * B + lane] += qv[r * d + c] * kt[c * B + lane]

    @T.macro
    def accumulate(sc, acc, vc, vs, bi, g, j0, kend):
        """acc[R, D] += P[R, B] @ V[B, D], one chunk of B output columns in registers."""
        oc = T.decl_buffer((rows * B,), f32, scope="local")
        if quantized:  # P scaled by each value row's scale (the sums keep the unscaled P)
            ps = T.decl_buffer((rows * B,), f32, scope="local")
            for r in range(rows):
                for lane in T.vectorized(B):
                    ps[r * B + lane] = sc[r * B + lane] * vs[bi, g, T.min(j0 + lane, kend - 1), 0]
        for cv in range(d // B):
            for r in T.unroll(rows):
                for lane in T.vectorized(B):
                    oc[r * B + lane] = acc[r * d + cv * B + lane]
            for jj in range(B):
                if quantized:
                    for r in T.unroll(rows):
                        for lane in T.vectorized(B):
                            oc[r * B + lane] += ps[r * B + jj] * T.Cast(f32, vc[
                                bi, g, T.min(j0 + jj, kend - 1), cv * B + lane])
                else:
                    for r in T.unroll(rows):
                        for lane in T.vectorized(B):
                            oc[r * B + lane] += sc[r * B + jj] * vc[
                                bi, g, T.min(j0 + jj, kend - 1), cv * B + lane]
            for r in T.unroll(rows):
                for lane in T.vectorized(B):
                    acc[r * d + cv * B + lane] = oc[r * B + lane]

    @T.macro
    def body(q, kc, vc, ks, vs, mask, o, b, s, past):
        ntiles: T.let[T.int64] = (s + qt - 1) // qt
        for task in T.parallel(b * kv_heads * ntiles):
            bi: T.let[T.int64] = task // (kv_heads * ntiles)
            g: T.let[T.int64] = task // ntiles % kv_heads
            tt: T.let[T.int64] = task % ntiles
            # zig-zag: cheap (early) and costly (late) causal tiles alternate
            tile: T.let[T.int64] = T.Select(tt % 2 == 0, tt // 2, ntiles - 1 - tt // 2)
            q0: T.let[T.int64] = tile * qt
            kend: T.let[T.int64] = past + T.min(q0 + qt, s) if causal else past + s
            qv = T.decl_buffer((rows * d,), f32, scope="local")
            acc = T.decl_buffer((rows * d,), f32, scope="local")
            kt = T.decl_buffer((d * B,), f32, scope="local")
            sc = T.decl_buffer((rows * B,), f32, scope="local")
            # running max [0, R), running sum [R, 2R), block max and rescale factor at 2R, 2R+1
            st = T.decl_buffer((rows * 2 + 2,), f32, scope="local")
            for r in range(rows):
                for c in T.vectorized(d):
                    qv[r * d + c] = T.Cast(f32, q[bi, T.min(q0 + r // group, s - 1),
                                                  (g * group + r % group) * d + c]) * T.float32(
                        scale)
                    acc[r * d + c] = T.float32(0)
                st[r] = T.float32(F32_MIN)
                st[rows + r] = T.float32(0)
            # a sliding window skips the blocks wholly before the tile's first query's window
            b0: T.let[T.int64] = (T.max(past + q0 + 1 - window, T.int64(0)) // B if window > 0
                                  else T.int64(0))
            for blk in range(b0, (kend + B - 1) // B):
                scores(qv, kt, sc, kc, ks, bi, g, blk * B, kend)
                softmax_block(sc, st, acc, mask, bi, blk * B, q0, kend, past)
                accumulate(sc, acc, vc, vs, bi, g, blk * B, kend)
            for r in range(rows):
                if q0 + r // group < s:
                    for c in T.vectorized(d):
                        o[bi, q0 + r // group, (g * group + r % group) * d + c] = T.Cast(
                            o.dtype, T.Select(st[rows + r] > T.float32(0),
                                              acc[r * d + c] / st[rows + r], T.float32(0)))

    return body
