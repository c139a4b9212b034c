"""KV-cache append (in place) and causal GQA attention with online softmax, as TIR kernels.

KV cache, one buffer per layer and per K/V:  # (batch, kv_heads, capacity, head_dim)
`kv_append` writes the new rows k/v[b, s, KV*D] at positions past..past+s-1 of both caches; the
Relax side calls it with `call_tir_inplace`, so the caches are mutated, never copied.
`attention` reads keys 0..past+s-1 from the caches. One parallel task per (batch, KV head,
query) serves the whole GQA group of query heads, so each K/V row is loaded once per group.
int8 caches (kv8): each cached row (batch, head, position) is stored as int8 with one float32
scale, k = q * scale, in a companion buffer (batch, kv_heads, capacity, 1). `kv_append_q8`
quantizes on write (scale = absmax / 127, round to nearest even); the attention kernels
dequantize as they read: the key scale multiplies a finished dot product, the value scale the
probability that weighs the row.
Keys stream in blocks of `block` rows; each block's scores live in a small local buffer
(never a score matrix), the running max/sum are rescaled once per block (online softmax).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.kernels.fastmath import fast_exp

F32_MIN = -3.4028234663852886e38  # np.finfo(float32).min: the interpreter's masked score


@functools.cache
def kv_append_kernel(kv_heads: int, head_dim: int, *, dtype: str = "float32",
                     parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(k_cache, v_cache, k[b, s, KV*D], v[b, s, KV*D], past): caches updated in place."""
    d, rows = head_dim, T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def kv_append(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle, past: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        k = T.match_buffer(k_h, (b, s, kv_heads * d), dtype)
        v = T.match_buffer(v_h, (b, s, kv_heads * d), dtype)
        T.Assert(past + s <= cap, "kv_append: past + seq exceeds the KV cache capacity")
        for bs in rows(b * s):
            for g in range(kv_heads):
                for c in T.vectorized(d):
                    kc[bs // s, g, past + bs % s, c] = k[bs // s, bs % s, g * d + c]
                    vc[bs // s, g, past + bs % s, c] = v[bs // s, bs % s, g * d + c]

    return kv_append


@functools.cache
def kv_append_q8_kernel(kv_heads: int, head_dim: int, *, dtype: str = "float32",
                        parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(k_cache, v_cache, k_scale, v_scale, k, v, past): int8 rows + scales, in place."""
    d, rows = head_dim, T.parallel if parallel else T.serial
    f32 = "float32"

    @T.macro
    def quantize_row(src, dst, scale, bi, si, g, pos):
        amax = T.decl_buffer((1,), f32, scope="local")
        amax[0] = T.float32(0)
        for c in range(d):
            amax[0] = T.max(amax[0], T.abs(T.Cast(f32, src[bi, si, g * d + c])))
        scale[bi, g, pos, 0] = amax[0] / T.float32(127)
        inv: T.let[T.float32] = T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0],
                                         T.float32(0))
        for c in T.vectorized(d):
            dst[bi, g, pos, c] = T.Cast("int8", T.nearbyint(T.Cast(f32, src[bi, si, g * d + c])
                                                            * inv))

    @T.prim_func(private=True)
    def kv_append_q8(kc_h: T.handle, vc_h: T.handle, ks_h: T.handle, vs_h: T.handle,
                     k_h: T.handle, v_h: T.handle, past: T.int64):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), "int8")
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), "int8")
        ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
        vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
        k = T.match_buffer(k_h, (b, s, kv_heads * d), dtype)
        v = T.match_buffer(v_h, (b, s, kv_heads * d), dtype)
        T.Assert(past + s <= cap, "kv_append: past + seq exceeds the KV cache capacity")
        for bs in rows(b * s):
            for g in range(kv_heads):
                quantize_row(k, kc, ks, bs // s, bs % s, g, past + bs % s)
                quantize_row(v, vc, vs, bs // s, bs % s, g, past + bs % s)

    return kv_append_q8


@functools.cache
def attention_kernel(heads: int, kv_heads: int, head_dim: int, scale: float, *,
                     causal: bool = True, masked: bool = False, block: int = 32,
                     dtype: str = "float32", mask_dtype: str = "int64",
                     quantized: bool = False, window: int = 0) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, (k_scale, v_scale,) (mask[b, past+s],) past,
    out[b, s, H*D]). Scalars precede the output: Relax call_tir appends it after all arguments.
    `window` > 0: query i sees keys i - window + 1 .. i only (sliding-window attention)."""
    body = _attention_body(heads, kv_heads, head_dim, scale, causal, masked, block, dtype,
                           quantized, window)
    return attention_entry(body, heads, kv_heads, head_dim, dtype=dtype, mask_dtype=mask_dtype,
                           masked=masked, quantized=quantized)


def attention_entry(body, heads: int, kv_heads: int, d: int, *, dtype: str, mask_dtype: str,
                    masked: bool, quantized: bool) -> tirx.PrimFunc:
    """The PrimFunc around an attention `body(q, kc, vc, ks, vs, mask, o, b, s, past)` macro, in
    the argument order the lowering passes: q, caches, (scales,) (mask,) past; output last."""
    hd, cdt, f32 = heads * d, "int8" if quantized else dtype, "float32"

    @T.macro
    def bind(q_h, kc_h, vc_h, ks_h, vs_h, mask_h, past, o_h):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), cdt)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), cdt)
        o = T.match_buffer(o_h, (b, s, hd), dtype)
        if quantized and masked:
            ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
            vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
            mask = T.match_buffer(mask_h, (b, past + s), mask_dtype)
            body(q, kc, vc, ks, vs, mask, o, b, s, past)
        elif quantized:
            ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
            vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
            body(q, kc, vc, ks, vs, None, o, b, s, past)
        elif masked:
            mask = T.match_buffer(mask_h, (b, past + s), mask_dtype)
            body(q, kc, vc, None, None, mask, o, b, s, past)
        else:
            body(q, kc, vc, None, None, None, o, b, s, past)

    if quantized and masked:

        @T.prim_func(private=True)
        def attention_q8_masked(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, ks_h: T.handle,
                                vs_h: T.handle, mask_h: T.handle, past: T.int64, o_h: T.handle):
            bind(q_h, kc_h, vc_h, ks_h, vs_h, mask_h, past, o_h)

        return attention_q8_masked
    if quantized:

        @T.prim_func(private=True)
        def attention_q8(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, ks_h: T.handle,
                         vs_h: T.handle, past: T.int64, o_h: T.handle):
            bind(q_h, kc_h, vc_h, ks_h, vs_h, None, past, o_h)

        return attention_q8
    if masked:

        @T.prim_func(private=True)
        def attention_masked(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, mask_h: T.handle,
                             past: T.int64, o_h: T.handle):
            bind(q_h, kc_h, vc_h, None, None, mask_h, past, o_h)

        return attention_masked

    @T.prim_func(private=True)
    def attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle, past: T.int64, o_h: T.handle):
        bind(q_h, kc_h, vc_h, None, None, None, past, o_h)

    return attention


def _lanes(head_dim: int) -> int:
    """The widest power of two <= 16 dividing head_dim: dot products then need no tail loop."""
    lanes = 16
    while head_dim % lanes:
        lanes //= 2
    return lanes


def _attention_body(heads: int, kv_heads: int, d: int, scale: float, causal: bool,
                    masked: bool, block: int, dtype: str, quantized: bool = False,
                    window: int = 0):
    group, lanes = heads // kv_heads, _lanes(d)
    f32 = "float32"

    @T.macro
    def halve(part, base, h):
        for lane in T.vectorized(h):
            part[base + lane] += part[base + lane + h]

    @T.macro
    def scores(qv, kb, ksc, bi, g, j, sc, jj):
        """sc[gi, jj] = q_gi . k_j for every head gi of the group: k_j is loaded once."""
        part = T.decl_buffer((group * lanes,), f32, scope="local")
        for t in T.unroll(group):
            for lane in T.vectorized(lanes):
                part[t * lanes + lane] = T.float32(0)
        for c in range(d // lanes):
            for t in T.unroll(group):
                for lane in T.vectorized(lanes):
                    part[t * lanes + lane] += qv[t * d + c * lanes + lane] * T.Cast(
                        f32, kb[bi, g, j, c * lanes + lane])
        for t in T.unroll(group):
            if lanes >= 16:
                halve(part, t * lanes, 8)
            if lanes >= 8:
                halve(part, t * lanes, 4)
            if lanes >= 4:
                halve(part, t * lanes, 2)
            if lanes >= 2:
                halve(part, t * lanes, 1)
            if quantized:  # the row's scale, once per dot product
                sc[t * block + jj] = part[t * lanes] * ksc[bi, g, j, 0]
            else:
                sc[t * block + jj] = part[t * lanes]

    @T.macro
    def body(q, kc, vc, ks, vs, mask, o, b, s, past):
        for task in T.parallel(b * kv_heads * s):
            bi: T.let[T.int64] = task // (kv_heads * s)
            g: T.let[T.int64] = task // s % kv_heads
            si: T.let[T.int64] = task % s
            kend: T.let[T.int64] = past + si + 1 if causal else past + s
            # first key: a sliding window starts window - 1 keys before the query
            k0: T.let[T.int64] = (T.max(past + si + 1 - window, T.int64(0)) if window > 0
                                  else T.int64(0))
            qv = T.decl_buffer((group * d,), f32, scope="local")
            acc = T.decl_buffer((group * d,), f32, scope="local")
            sc = T.decl_buffer((group * block,), f32, scope="local")
            # per head: running max, running sum, block max, rescale factor
            st = T.decl_buffer((group * 4,), f32, scope="local")
            for t in range(group):
                for c in T.vectorized(d):
                    qv[t * d + c] = T.Cast(f32, q[bi, si, (g * group + t) * d + c]) * T.float32(
                        scale)
                    acc[t * d + c] = T.float32(0)
                st[t * 4] = T.float32(F32_MIN)
                st[t * 4 + 1] = T.float32(0)
            for blk in range((kend - k0 + block - 1) // block):
                for t in range(group):
                    st[t * 4 + 2] = T.float32(F32_MIN)
                for jj in range(T.min(block, kend - k0 - blk * block)):
                    scores(qv, kc, ks, bi, g, k0 + blk * block + jj, sc, jj)
                    for t in range(group):
                        if masked:  # noqa: SIM102 - a parse-time `if` around a runtime one
                            if mask[bi, k0 + blk * block + jj] == 0:
                                sc[t * block + jj] = T.float32(F32_MIN)
                        st[t * 4 + 2] = T.max(st[t * 4 + 2], sc[t * block + jj])
                for t in range(group):
                    st[t * 4 + 3] = fast_exp(st[t * 4] - T.max(st[t * 4], st[t * 4 + 2]))
                    st[t * 4] = T.max(st[t * 4], st[t * 4 + 2])
                    st[t * 4 + 1] = st[t * 4 + 1] * st[t * 4 + 3]
                    for c in T.vectorized(d):
                        acc[t * d + c] = acc[t * d + c] * st[t * 4 + 3]
                for jj in range(T.min(block, kend - k0 - blk * block)):
                    for t in range(group):
                        sc[t * block + jj] = fast_exp(sc[t * block + jj] - st[t * 4])
                        st[t * 4 + 1] += sc[t * block + jj]
                    for t in T.unroll(group):  # LLVM loads v_j once for the group
                        if quantized:
                            for c in T.vectorized(d):
                                acc[t * d + c] += sc[t * block + jj] * vs[
                                    bi, g, k0 + blk * block + jj, 0] * T.Cast(
                                    f32, vc[bi, g, k0 + blk * block + jj, c])
                        else:
                            for c in T.vectorized(d):
                                acc[t * d + c] += sc[t * block + jj] * T.Cast(
                                    f32, vc[bi, g, k0 + blk * block + jj, c])
            for t in range(group):
                for c in T.vectorized(d):
                    o[bi, si, (g * group + t) * d + c] = T.Cast(dtype, acc[t * d + c] /
                                                                st[t * 4 + 1])

    return body
