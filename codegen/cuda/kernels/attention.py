"""CUDA attention over the in-place KV cache, hand-scheduled TIR (explicit thread bindings).

KV cache, one buffer per layer and per K/V:  # (batch, kv_heads, capacity, head_dim)
q/out: (batch, seq, heads * head_dim). `past` (tokens already cached) is read from a one-element
int32 device tensor, not passed as a kernel scalar: a CUDA graph captured for the decode step then
stays valid as `past` grows (a scalar would be baked into the captured launch). The decode
kernels also take one length per batch row (a tensor (batch,): sequences of different lengths
in one batch; row i reads past[i], a one-element tensor serves every row).

- `past_kernel`: writes `past` into that tensor (runs outside the captured graph); the per-row
  lengths are written the same way (kiln.codegen.cuda.lower, past + each row's offset).
- `kv_append_kernel`: new rows k/v[b, s, KV*D] -> caches at past..past+s-1, in place.
- `decode_attention_kernel`: blocks per (batch, query, head) each over a share of the keys
  (split-KV); a block's warps split its keys, their lanes the head dimension; each warp keeps
  an online-softmax state, the block merges them in shared memory and a second kernel the
  blocks' states.
- `prefill_attention_kernel`: flash-attention tiling: one block per (batch, head, BQ queries),
  one thread per query; K/V tiles of BK rows are staged in shared memory, scores live in
  registers (never a score matrix), online softmax per tile. Causal.
All accumulate in float32 whatever the storage dtype.

int8 caches (kv8, kiln.passes.quantize_kv_cache): each cached row (batch, head, position) is
int8 codes with one float32 scale in a companion buffer (batch, kv_heads, capacity, 1), the
row's value codes * scale (transformer_ops.kv8_roundtrip). `kv_append_q8_kernel` quantizes on
write; the attention kernels (`kv8=True`) take the two scale buffers after the caches and load
int8 rows (half of fp16's bytes), the key's scale multiplying the finished dot product, the
value's the probability that weighs its row (the prefill kernel dequantizes its K/V tiles as it
stages them in shared memory).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import pdl as P

F32_MIN = -3.4028234663852886e38
NT = 64  # decode, any head dim: threads per block (keys split over them, states merged)
DW, DU = 16, 8  # decode, head dim a multiple of 32: warps per block, keys per warp per step
#: decode: most blocks one (batch, query, head)'s keys are split over; the scratch of their
#: states is sized for it whatever the split count
MAX_SPLITS = 16
#: split-KV by default (the cost model's split count); the benchmarks' `nosplit` variant clears
#: it (one block per head, for an A/B run)
SPLIT_DECODE = True
#: the warp kernel for head dims that are multiples of 32; the benchmarks' `oldattn` variant
#: clears it (for an A/B run against `_decode_attention_threads`)
WARP_DECODE = True


def _vec(dtype: str, head_dim: int) -> int:
    """Elements per 16-byte load (fewer when head_dim is not a multiple of that)."""
    vec = 16 // {"int8": 1, "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}[dtype]
    while head_dim % vec:
        vec //= 2
    return vec


@functools.cache
def past_kernel() -> tirx.PrimFunc:
    """PrimFunc(past, out[1] int32): out[0] = past."""

    @T.prim_func(private=True)
    def kv_past(past: T.int64, o: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for _tx in T.thread_binding(1, thread="threadIdx.x"):
            o[0] = T.Cast("int32", past)

    return kv_past


@functools.cache
def row_lengths_kernel(rows: int) -> tirx.PrimFunc:
    """PrimFunc(past, offset_0 .. offset_{rows-1}, out[b] int32): out[i] = past + offset_i,
    the cached length of batch row i (b <= rows; past and the offsets are scalars of the call,
    so it runs outside a captured graph, like past_kernel). Left unscheduled: dlight's
    Fallback binds its threads."""
    from tvm import te

    past = tirx.Var("past", "int64")
    offsets = [tirx.Var(f"offset_{i}", "int64") for i in range(rows)]

    def at(i):
        pick = offsets[-1]
        for j in reversed(range(rows - 1)):
            pick = tirx.Select(i == j, offsets[j], pick)
        return (past + pick).astype("int32")

    out = te.compute((tirx.Var("b", "int64"),), at, name="row_lengths")
    # (without create_prim_func's global symbol `main`: named as the module names it)
    return te.create_prim_func([past, *offsets, out]).without_attr("global_symbol")


@functools.cache
def kv_append_kernel(kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """PrimFunc(k_cache, v_cache, k[b, s, KV*D], v[b, s, KV*D], past[1 or b]): caches in
    place (row i at past[i], or past[0] for every row)."""
    d, kvd, threads = head_dim, kv_heads * head_dim, 256

    @T.prim_func(private=True)
    def kv_append(kc_h: T.handle, vc_h: T.handle, k_h: T.handle, v_h: T.handle,
                  pst_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        k = T.match_buffer(k_h, (b, s, kvd), dtype)
        v = T.match_buffer(v_h, (b, s, kvd), dtype)
        for bx in T.thread_binding((b * s * kvd + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                i: T.let[T.int64] = bx * threads + tx
                if i < b * s * kvd:
                    bi: T.let[T.int64] = i // (s * kvd)
                    si: T.let[T.int64] = i // kvd % s
                    g: T.let[T.int64] = i % kvd // d
                    row: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si
                    kc[bi, g, row, i % d] = k[bi, si, i % kvd]
                    vc[bi, g, row, i % d] = v[bi, si, i % kvd]

    return kv_append


#: quantizing append: warps (cached rows) per block
QW = 4


@functools.cache
def kv_append_q8_kernel(kv_heads: int, head_dim: int, dtype: str) -> tirx.PrimFunc:
    """PrimFunc(k_cache, v_cache int8, k_scale, v_scale (b, KV, cap, 1) float32, k[b, s, KV*D],
    v[b, s, KV*D], past[1 or b]): the new rows quantized into the caches in place (row i at
    past[i], or past[0] for every row), transformer_ops.kv8_roundtrip's arithmetic in float32:
    scale = absmax / 127, codes round-half-even(x * (127 / absmax)), an all-zero row scale 0
    and codes 0. One warp per (batch, new row, head), its lanes over the head dim (the absmax
    by a butterfly of shuffles), the K and the V row side by side. The divisions are IEEE
    (__fdiv_rn), not the fast-math approximations nvcc would otherwise use: codes and scales
    are bit-exact with the numpy specification."""
    d, kvd, f32 = head_dim, kv_heads * head_dim, "float32"
    per = (d + 31) // 32  # elements per lane
    full = T.uint32(0xFFFFFFFF)

    def div(a, b):
        return T.call_pure_extern(f32, "__fdiv_rn", a, b)

    @T.prim_func(private=True)
    def kv_append_q8(kc_h: T.handle, vc_h: T.handle, ks_h: T.handle, vs_h: T.handle,
                     k_h: T.handle, v_h: T.handle, pst_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), "int8")
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), "int8")
        ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
        vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
        k = T.match_buffer(k_h, (b, s, kvd), dtype)
        v = T.match_buffer(v_h, (b, s, kvd), dtype)
        for bx in T.thread_binding((b * s * kv_heads + QW - 1) // QW, thread="blockIdx.x"):
            for ty in T.thread_binding(QW, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    xk = T.decl_buffer((per,), f32, scope="local")
                    xv = T.decl_buffer((per,), f32, scope="local")
                    am = T.decl_buffer((2,), f32, scope="local")  # K's and V's absmax
                    r: T.let[T.int64] = bx * QW + ty
                    if r < b * s * kv_heads:  # (the warp's lanes take the branch together)
                        bi: T.let[T.int64] = r // (s * kv_heads)
                        si: T.let[T.int64] = r // kv_heads % s
                        g: T.let[T.int64] = r % kv_heads
                        row: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si
                        am[0] = T.float32(0)
                        am[1] = T.float32(0)
                        for j in T.unroll(per):
                            xk[j] = T.Select(j * 32 + tx < d, T.Cast(
                                f32, k[bi, si, g * d + T.min(j * 32 + tx, d - 1)]),
                                T.float32(0))
                            xv[j] = T.Select(j * 32 + tx < d, T.Cast(
                                f32, v[bi, si, g * d + T.min(j * 32 + tx, d - 1)]),
                                T.float32(0))
                            am[0] = T.max(am[0], T.abs(xk[j]))
                            am[1] = T.max(am[1], T.abs(xv[j]))
                        for lvl in T.unroll(5):
                            am[0] = T.max(am[0], T.tvm_warp_shuffle_xor(full, am[0], 16 >> lvl,
                                                                        32, 32))
                            am[1] = T.max(am[1], T.tvm_warp_shuffle_xor(full, am[1], 16 >> lvl,
                                                                        32, 32))
                        if tx == 0:
                            ks[bi, g, row, 0] = div(am[0], T.float32(127))
                            vs[bi, g, row, 0] = div(am[1], T.float32(127))
                        # 127 / absmax, 0 for a zero row (its codes 0)
                        am[0] = T.Select(am[0] > T.float32(0), div(T.float32(127), am[0]),
                                         T.float32(0))
                        am[1] = T.Select(am[1] > T.float32(0), div(T.float32(127), am[1]),
                                         T.float32(0))
                        for j in T.unroll(per):
                            if j * 32 + tx < d:
                                kc[bi, g, row, j * 32 + tx] = T.Cast(
                                    "int8", T.nearbyint(xk[j] * am[0]))
                                vc[bi, g, row, j * 32 + tx] = T.Cast(
                                    "int8", T.nearbyint(xv[j] * am[1]))

    return kv_append_q8


@functools.cache
def decode_attention_kernel(heads: int, kv_heads: int, head_dim: int, scale: float,
                            dtype: str, *, pdl: bool = False, warps: bool = True,
                            dw: int = DW, du: int = DU, splits: int = 1,
                            kv8: bool = False) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, past[1 or b], part, out[b, s, H*D]), causal;
    any s, best for s = 1. Query i (0-based in the new rows) of batch row r sees keys
    0..past[r]+i (past[0] for every row where past has one element). `kv8`: int8 caches,
    PrimFunc(q, k_cache, v_cache, k_scale, v_scale, past, part, out).

    `splits` blocks of dw warps per (batch, query, head), each over a contiguous share of the
    keys (flash-decoding: a long context fills the GPU instead of one block per head). The
    lanes of a warp split the head dimension (D / 32 elements each: a key row is one coalesced
    load) and a warp takes du keys at a time, all their K and V loads issued before the first
    use; scores are summed across the lanes by a butterfly of shuffles, so every lane holds
    them and keeps its slice of the online-softmax output. The warps' states are merged in
    shared memory; with one split that is the output, else each split writes its state
    (max, sum, unnormalized output) to `part` (b, s, H, MAX_SPLITS, D + 2) float32 and a second
    kernel merges the splits that had keys. A split's share is a whole number of dw * du key
    steps, so a short context uses the first split alone. With kv8 a lane loads its D / 32
    int8 codes of a row in one load (D = 64: 2 bytes, the warp's row 64 bytes) and every lane
    the row's two scales (a broadcast read each), beside the codes.
    (dw, du, splits: the schedule space cuda.decode_attention's knobs.)
    Head dims that are not a multiple of 32 (or `warps` false) take
    `_decode_attention_threads` (no `part`)."""
    if head_dim % 32 or not warps:
        return _decode_attention_threads(heads, kv_heads, head_dim, scale, dtype, pdl,
                                         kv8=kv8)
    if not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits {splits} not in 1..{MAX_SPLITS}")
    d, group, hd, f32 = head_dim, heads // kv_heads, heads * head_dim, "float32"
    per, keys = head_dim // 32, dw * du  # elements per lane; keys per block per step
    cdt = "int8" if kv8 else dtype  # the caches' elements
    full = T.uint32(0xFFFFFFFF)

    @T.macro
    def attend(q, kc, vc, ksc, vsc, pst, part, o, b, s, pn):
        for blk in T.thread_binding(b * s * heads * splits, thread="blockIdx.x"):
            for ty in T.thread_binding(dw, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    ms = T.decl_buffer((dw,), f32, scope="shared")
                    ls = T.decl_buffer((dw,), f32, scope="shared")
                    os = T.decl_buffer((dw * d,), f32, scope="shared")
                    qv = T.decl_buffer((per,), f32, scope="local")
                    acc = T.decl_buffer((per,), f32, scope="local")
                    kr = T.decl_buffer((du * per,), cdt, scope="local")
                    vr = T.decl_buffer((du * per,), cdt, scope="local")
                    if kv8:  # the du rows' key and value scales
                        kq = T.decl_buffer((du,), f32, scope="local")
                        vq = T.decl_buffer((du,), f32, scope="local")
                    sc = T.decl_buffer((du,), f32, scope="local")
                    # running max, running sum, new max, rescale of the old state
                    st = T.decl_buffer((4,), f32, scope="local")
                    sp: T.let[T.int64] = blk % splits
                    row: T.let[T.int64] = blk // splits
                    bi: T.let[T.int64] = row // (s * heads)
                    si: T.let[T.int64] = row // heads % s
                    h: T.let[T.int64] = row % heads
                    g: T.let[T.int64] = h // group
                    P.wait(pdl)
                    kend: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si + 1
                    chunk: T.let[T.int64] = ((kend + splits - 1) // splits + keys - 1) \
                        // keys * keys
                    base: T.let[T.int64] = sp * chunk
                    kstop: T.let[T.int64] = T.min(base + chunk, kend)
                    for c in T.unroll(per):
                        qv[c] = T.Cast(f32, q[bi, si, h * d + tx * per + c]) * T.float32(scale)
                        acc[c] = T.float32(0)
                    st[0] = T.float32(F32_MIN)
                    st[1] = T.float32(0)
                    for it in range((kstop - base + keys - 1) // keys):
                        for u in T.unroll(du):
                            for c in T.vectorized(per):
                                kr[u * per + c] = kc[bi, g, T.min(base + it * keys + ty * du + u,
                                                                  kend - 1), tx * per + c]
                        for u in T.unroll(du):
                            for c in T.vectorized(per):
                                vr[u * per + c] = vc[bi, g, T.min(base + it * keys + ty * du + u,
                                                                  kend - 1), tx * per + c]
                        if kv8:
                            for u in T.unroll(du):
                                kq[u] = ksc[bi, g, T.min(base + it * keys + ty * du + u,
                                                         kend - 1), 0]
                                vq[u] = vsc[bi, g, T.min(base + it * keys + ty * du + u,
                                                         kend - 1), 0]
                        for u in T.unroll(du):
                            sc[u] = T.float32(0)
                            for c in T.unroll(per):
                                sc[u] += qv[c] * T.Cast(f32, kr[u * per + c])
                        for lvl in T.unroll(5):
                            for u in T.unroll(du):
                                sc[u] = sc[u] + T.tvm_warp_shuffle_xor(full, sc[u], 16 >> lvl,
                                                                       32, 32)
                        if kv8:  # the key's scale times its finished dot product
                            for u in T.unroll(du):
                                sc[u] = sc[u] * kq[u]
                        st[2] = st[0]
                        for u in T.unroll(du):
                            sc[u] = T.Select(base + it * keys + ty * du + u < kstop, sc[u],
                                             T.float32(F32_MIN))
                            st[2] = T.max(st[2], sc[u])
                        st[3] = T.exp(st[0] - st[2])
                        st[1] = st[1] * st[3]
                        for c in T.unroll(per):
                            acc[c] = acc[c] * st[3]
                        for u in T.unroll(du):
                            sc[u] = T.Select(base + it * keys + ty * du + u < kstop,
                                             T.exp(sc[u] - st[2]), T.float32(0))
                            st[1] += sc[u]
                            if kv8:  # the value's scale weighs its row with the probability
                                sc[u] = sc[u] * vq[u]
                            for c in T.unroll(per):
                                acc[c] += sc[u] * T.Cast(f32, vr[u * per + c])
                        st[0] = st[2]
                    if tx == 0:
                        ms[ty] = st[0]
                        ls[ty] = st[1]
                    for c in T.unroll(per):
                        os[ty * d + tx * per + c] = acc[c]
                    T.tvm_storage_sync("shared")
                    for c0 in range((d + dw * 32 - 1) // (dw * 32)):
                        col: T.let[T.int32] = c0 * dw * 32 + ty * 32 + tx
                        if col < d:
                            st[2] = T.float32(F32_MIN)
                            for w in T.unroll(dw):
                                st[2] = T.max(st[2], ms[w])
                            st[1] = T.float32(0)
                            st[0] = T.float32(0)
                            for w in T.unroll(dw):
                                st[3] = T.exp(ms[w] - st[2])
                                st[1] += ls[w] * st[3]
                                st[0] += os[w * d + col] * st[3]
                            if splits == 1:
                                o[bi, si, h * d + col] = T.Cast(dtype, st[0] / st[1])
                            elif base < kend:  # this split's state, for the merge
                                part[bi, si, h, sp, 2 + col] = st[0]
                                if col == 0:
                                    part[bi, si, h, sp, 0] = st[2]
                                    part[bi, si, h, sp, 1] = st[1]
        if splits > 1:  # the merge: one thread per output element
            for blk in T.thread_binding(b * s * heads, thread="blockIdx.x"):
                for tx in T.thread_binding(d, thread="threadIdx.x"):
                    mt = T.decl_buffer((3,), f32, scope="local")  # max, sum, output
                    bi: T.let[T.int64] = blk // (s * heads)
                    si: T.let[T.int64] = blk // heads % s
                    h: T.let[T.int64] = blk % heads
                    P.wait(pdl)
                    kend: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si + 1
                    chunk: T.let[T.int64] = ((kend + splits - 1) // splits + keys - 1) \
                        // keys * keys
                    used: T.let[T.int64] = (kend + chunk - 1) // chunk
                    mt[0] = T.float32(F32_MIN)
                    for j in range(used):
                        mt[0] = T.max(mt[0], part[bi, si, h, j, 0])
                    mt[1] = T.float32(0)
                    mt[2] = T.float32(0)
                    for j in range(used):
                        mt[1] += part[bi, si, h, j, 1] * T.exp(part[bi, si, h, j, 0] - mt[0])
                        mt[2] += part[bi, si, h, j, 2 + tx] * T.exp(part[bi, si, h, j, 0]
                                                                    - mt[0])
                    o[bi, si, h * d + tx] = T.Cast(dtype, mt[2] / mt[1])

    if kv8:
        @T.prim_func(private=True)
        def decode_attention_kv8(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                                 ks_h: T.handle, vs_h: T.handle, pst_h: T.handle,
                                 part_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
            pst = T.match_buffer(pst_h, (pn,), "int32")
            q = T.match_buffer(q_h, (b, s, hd), dtype)
            kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), cdt)
            vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), cdt)
            ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
            vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
            part = T.match_buffer(part_h, (b, s, heads, MAX_SPLITS, d + 2), f32)
            o = T.match_buffer(o_h, (b, s, hd), dtype)
            attend(q, kc, vc, ks, vs, pst, part, o, b, s, pn)

        return decode_attention_kv8

    @T.prim_func(private=True)
    def decode_attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                         pst_h: T.handle, part_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        part = T.match_buffer(part_h, (b, s, heads, MAX_SPLITS, d + 2), f32)
        o = T.match_buffer(o_h, (b, s, hd), dtype)
        attend(q, kc, vc, None, None, pst, part, o, b, s, pn)

    return decode_attention


@functools.cache
def window_attention_kernel(heads: int, kv_heads: int, head_dim: int, scale: float,
                            dtype: str, window: int, *, kv8: bool = False) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, past[1 or b], out[b, s, H*D]): causal
    sliding-window attention for any s (prefill and decode): query i (absolute position
    past + i) sees keys past + i - window + 1 .. past + i only. One block per (batch, query,
    head) over at most `window` keys (`_decode_attention_threads` starting at the window's
    first key). `kv8`: int8 caches, their scales after them."""
    if window <= 0:
        raise ValueError(f"window {window} must be positive")
    return _decode_attention_threads(heads, kv_heads, head_dim, scale, dtype, False,
                                     window=window, kv8=kv8)


def _decode_attention_threads(heads: int, kv_heads: int, head_dim: int, scale: float,
                              dtype: str, pdl: bool, *, window: int = 0,
                              kv8: bool = False) -> tirx.PrimFunc:
    """Decode attention for any head dim: one block of NT threads per (batch, query, head),
    each thread a share of the keys with its own online-softmax state, merged in shared
    memory at the end. `window` > 0: the keys start window - 1 before the query's. `kv8`:
    PrimFunc(q, k_cache, v_cache int8, k_scale, v_scale, past, out), rows of 16 codes a load."""
    d, group, hd, f32 = head_dim, heads // kv_heads, heads * head_dim, "float32"
    cdt = "int8" if kv8 else dtype  # the caches' elements
    vec = _vec(cdt, d)
    stride = d + 1  # shared rows padded by one word: no bank conflicts
    windowed = window > 0

    @T.macro
    def attend(q, kc, vc, ksc, vsc, pst, o, b, s, pn):
        for blk in T.thread_binding(b * s * heads, thread="blockIdx.x"):
            for tx in T.thread_binding(NT, thread="threadIdx.x"):
                P.wait(pdl)
                ms = T.decl_buffer((NT,), f32, scope="shared")
                ls = T.decl_buffer((NT,), f32, scope="shared")
                os = T.decl_buffer((NT * stride,), f32, scope="shared")
                qv = T.decl_buffer((d,), f32, scope="local")
                acc = T.decl_buffer((d,), f32, scope="local")
                row = T.decl_buffer((d,), cdt, scope="local")  # a K or V row, 16-byte loads
                # running max, running sum, score / merged max, new max / merged sum,
                # rescale of the old state, weight of the new key
                st = T.decl_buffer((6,), f32, scope="local")
                bi: T.let[T.int64] = blk // (s * heads)
                si: T.let[T.int64] = blk // heads % s
                h: T.let[T.int64] = blk % heads
                g: T.let[T.int64] = h // group
                kend: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si + 1
                # the first key (0 without a window)
                k0: T.let[T.int64] = T.max(kend - window, T.int64(0)) if windowed else T.int64(0)
                for c in T.unroll(d):
                    qv[c] = T.Cast(f32, q[bi, si, h * d + c]) * T.float32(scale)
                    acc[c] = T.float32(0)
                st[0] = T.float32(F32_MIN)
                st[1] = T.float32(0)
                for it in range((kend - k0 - tx + NT - 1) // NT):
                    st[2] = T.float32(0)
                    for cv in T.unroll(d // vec):
                        for lane in T.vectorized(vec):
                            row[cv * vec + lane] = kc[bi, g, k0 + tx + it * NT,
                                                      cv * vec + lane]
                    for c in T.unroll(d):
                        st[2] += qv[c] * T.Cast(f32, row[c])
                    if kv8:  # the key's scale times its finished dot product
                        st[2] = st[2] * ksc[bi, g, k0 + tx + it * NT, 0]
                    st[3] = T.max(st[0], st[2])
                    st[4] = T.exp(st[0] - st[3])
                    st[5] = T.exp(st[2] - st[3])
                    st[1] = st[1] * st[4] + st[5]
                    if kv8:  # the value's scale weighs its row with the probability
                        st[5] = st[5] * vsc[bi, g, k0 + tx + it * NT, 0]
                    for cv in T.unroll(d // vec):
                        for lane in T.vectorized(vec):
                            row[cv * vec + lane] = vc[bi, g, k0 + tx + it * NT,
                                                      cv * vec + lane]
                    for c in T.unroll(d):
                        acc[c] = acc[c] * st[4] + st[5] * T.Cast(f32, row[c])
                    st[0] = st[3]
                ms[tx] = st[0]
                ls[tx] = st[1]
                T.tvm_storage_sync("shared")
                st[2] = T.float32(F32_MIN)
                for t in range(NT):
                    st[2] = T.max(st[2], ms[t])
                st[3] = T.float32(0)
                for t in range(NT):
                    st[3] += ls[t] * T.exp(ms[t] - st[2])
                st[4] = T.exp(st[0] - st[2])
                for c in T.unroll(d):
                    os[tx * stride + c] = acc[c] * st[4]
                T.tvm_storage_sync("shared")
                for c0 in range((d + NT - 1) // NT):
                    if c0 * NT + tx < d:
                        st[1] = T.float32(0)
                        for t in range(NT):
                            st[1] += os[t * stride + c0 * NT + tx]
                        o[bi, si, h * d + c0 * NT + tx] = T.Cast(dtype, st[1] / st[3])

    if kv8:
        @T.prim_func(private=True)
        def decode_attention_kv8(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                                 ks_h: T.handle, vs_h: T.handle, pst_h: T.handle,
                                 o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
            pst = T.match_buffer(pst_h, (pn,), "int32")  # per row, or one for all
            q = T.match_buffer(q_h, (b, s, hd), dtype)
            kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), cdt)
            vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), cdt)
            ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
            vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
            o = T.match_buffer(o_h, (b, s, hd), dtype)
            attend(q, kc, vc, ks, vs, pst, o, b, s, pn)

        return decode_attention_kv8

    @T.prim_func(private=True)
    def decode_attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                         pst_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")  # per row, or one for all
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        o = T.match_buffer(o_h, (b, s, hd), dtype)
        attend(q, kc, vc, None, None, pst, o, b, s, pn)

    return decode_attention


@functools.cache
def prefill_attention_kernel(heads: int, kv_heads: int, head_dim: int, scale: float,
                             dtype: str, *, bq: int = 64, bk: int = 16,
                             kv8: bool = False) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, past[1], out[b, s, H*D]), causal, tiled.
    `kv8`: PrimFunc(q, k_cache, v_cache int8, k_scale, v_scale, past, out); a thread's 16
    codes of a K (V) row are staged times the row's scale."""
    d, group, hd, f32 = head_dim, heads // kv_heads, heads * head_dim, "float32"
    cdt = "int8" if kv8 else dtype  # the caches' elements
    vec = _vec(cdt, d)
    loads = (bk * d + bq * vec - 1) // (bq * vec)  # vector loads per thread per K (or V) tile
    f4 = 4 if d % 4 == 0 and vec % 4 == 0 else 1  # float32 lanes per shared-memory read

    @T.macro
    def attend(q, kc, vc, ksc, vsc, pst, o, b, s):
        ntiles: T.let[T.int64] = (s + bq - 1) // bq
        for blk in T.thread_binding(b * heads * ntiles, thread="blockIdx.x"):
            for tx in T.thread_binding(bq, thread="threadIdx.x"):
                # K/V tiles converted to float32 once, read back 16 bytes at a time (a
                # broadcast: every thread reads the same key), four FMAs per read
                ks = T.decl_buffer((bk * d,), f32, scope="shared")
                vs = T.decl_buffer((bk * d,), f32, scope="shared")
                # one staging buffer each: TVM's CUDA codegen reuses the converted value of a
                # local vector it already read, even after the buffer was overwritten
                ldk = T.decl_buffer((vec,), cdt, scope="local")
                ldv = T.decl_buffer((vec,), cdt, scope="local")
                if kv8:  # the staged row's key and value scales
                    sq = T.decl_buffer((2,), f32, scope="local")
                kr = T.decl_buffer((f4,), f32, scope="local")
                qv = T.decl_buffer((d,), f32, scope="local")
                acc = T.decl_buffer((d,), f32, scope="local")
                sc = T.decl_buffer((bk,), f32, scope="local")
                # running max, running sum, tile max, new max, rescale of the old state
                st = T.decl_buffer((5,), f32, scope="local")
                bi: T.let[T.int64] = blk // (heads * ntiles)
                h: T.let[T.int64] = blk // ntiles % heads
                tile: T.let[T.int64] = ntiles - 1 - blk % ntiles  # the longest tiles first
                g: T.let[T.int64] = h // group
                past: T.let[T.int64] = T.Cast("int64", pst[0])
                qi: T.let[T.int64] = tile * bq + tx
                mine: T.let[T.int64] = past + qi + 1  # keys this query sees
                kend: T.let[T.int64] = past + T.min(tile * bq + bq, s)  # keys the block needs
                for c in T.unroll(d):
                    qv[c] = T.Cast(f32, q[bi, T.min(qi, s - 1), h * d + c]) * T.float32(scale)
                    acc[c] = T.float32(0)
                st[0] = T.float32(F32_MIN)
                st[1] = T.float32(0)
                for kt in range((kend + bk - 1) // bk):
                    for e in range(loads):
                        if (e * bq + tx) * vec < bk * d:
                            for lane in T.vectorized(vec):
                                ldk[lane] = kc[
                                    bi, g, T.min(kt * bk + (e * bq + tx) * vec // d, kend - 1),
                                    ((e * bq + tx) * vec + lane) % d]
                            for lane in T.vectorized(vec):
                                ldv[lane] = vc[
                                    bi, g, T.min(kt * bk + (e * bq + tx) * vec // d, kend - 1),
                                    ((e * bq + tx) * vec + lane) % d]
                            if kv8:  # dequantized as staged: codes times the row's scale
                                sq[0] = ksc[bi, g, T.min(kt * bk + (e * bq + tx) * vec // d,
                                                         kend - 1), 0]
                                sq[1] = vsc[bi, g, T.min(kt * bk + (e * bq + tx) * vec // d,
                                                         kend - 1), 0]
                                for part in T.unroll(vec // f4):
                                    for lane in T.vectorized(f4):
                                        ks[(e * bq + tx) * vec + part * f4 + lane] = T.Cast(
                                            f32, ldk[part * f4 + lane]) * sq[0]
                                    for lane in T.vectorized(f4):
                                        vs[(e * bq + tx) * vec + part * f4 + lane] = T.Cast(
                                            f32, ldv[part * f4 + lane]) * sq[1]
                            else:
                                for part in T.unroll(vec // f4):
                                    for lane in T.vectorized(f4):
                                        ks[(e * bq + tx) * vec + part * f4 + lane] = T.Cast(
                                            f32, ldk[part * f4 + lane])
                                    for lane in T.vectorized(f4):
                                        vs[(e * bq + tx) * vec + part * f4 + lane] = T.Cast(
                                            f32, ldv[part * f4 + lane])
                    T.tvm_storage_sync("shared")
                    st[2] = T.float32(F32_MIN)
                    for j in T.unroll(bk):
                        sc[j] = T.float32(0)
                        for c4 in T.unroll(d // f4):
                            for lane in T.vectorized(f4):
                                kr[lane] = ks[j * d + c4 * f4 + lane]
                            for lane in T.unroll(f4):
                                sc[j] += qv[c4 * f4 + lane] * kr[lane]
                        sc[j] = T.Select(kt * bk + j < mine, sc[j], T.float32(F32_MIN))
                        st[2] = T.max(st[2], sc[j])
                    st[3] = T.max(st[0], st[2])
                    st[4] = T.exp(st[0] - st[3])
                    st[1] = st[1] * st[4]
                    for c in T.unroll(d):
                        acc[c] = acc[c] * st[4]
                    for j in T.unroll(bk):
                        sc[j] = T.exp(sc[j] - st[3])
                        st[1] += sc[j]
                        for c4 in T.unroll(d // f4):
                            for lane in T.vectorized(f4):
                                kr[lane] = vs[j * d + c4 * f4 + lane]
                            for lane in T.unroll(f4):
                                acc[c4 * f4 + lane] += sc[j] * kr[lane]
                    st[0] = st[3]
                    T.tvm_storage_sync("shared")
                if qi < s:
                    for c in T.unroll(d):
                        o[bi, qi, h * d + c] = T.Cast(dtype, acc[c] / st[1])

    if kv8:
        @T.prim_func(private=True)
        def prefill_attention_kv8(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                                  ks_h: T.handle, vs_h: T.handle,
                                  pst: T.Buffer((1,), "int32"), o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            b, s, cap = T.int64(), T.int64(), T.int64()
            q = T.match_buffer(q_h, (b, s, hd), dtype)
            kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), cdt)
            vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), cdt)
            ks = T.match_buffer(ks_h, (b, kv_heads, cap, 1), f32)
            vs = T.match_buffer(vs_h, (b, kv_heads, cap, 1), f32)
            o = T.match_buffer(o_h, (b, s, hd), dtype)
            attend(q, kc, vc, ks, vs, pst, o, b, s)

        return prefill_attention_kv8

    @T.prim_func(private=True)
    def prefill_attention(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                          pst: T.Buffer((1,), "int32"), o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        o = T.match_buffer(o_h, (b, s, hd), dtype)
        attend(q, kc, vc, None, None, pst, o, b, s)

    return prefill_attention


@functools.cache
def qkv_rotary_append_kernel(heads: int, kv_heads: int, head_dim: int, rot: int,
                             interleaved: bool, dtype: str, *,
                             pdl: bool = False) -> tirx.PrimFunc:
    """PrimFunc(qkv[b, s, (H + 2 KV) * D], cos[cb, s, R], sin[cb, s, R], k_cache, v_cache,
    past[1], q_out[b, s, H*D]): rotary on q and k, k and v appended to the caches in place.

    One kernel for what is otherwise a split (three copies), two rotary kernels and kv_append:
    each thread produces one element of q_out or one of a new cache row.
    """
    d, hd, kvd, threads, half = head_dim, heads * head_dim, kv_heads * head_dim, 256, rot // 2
    width, f32 = hd + 2 * kvd, "float32"

    def rotate(qkv, bi, si, base, c, cos, sin, ci):
        """Element c (< D) of the head starting at qkv[bi, si, base], rotated."""
        def at(t):
            return T.Cast(f32, qkv[bi, si, base + t])

        x = at(c)
        if interleaved:
            partner = T.Select(c % 2 == 0, -at(T.min(c + 1, d - 1)), at(T.max(c - 1, 0)))
        else:
            partner = T.Select(c < half, -at(T.min(c + half, d - 1)), at(T.max(c - half, 0)))
        cc = T.min(c, rot - 1)
        y = x * T.Cast(f32, cos[ci, si, cc]) + partner * T.Cast(f32, sin[ci, si, cc])
        return T.Cast(dtype, T.Select(c < rot, y, x))

    @T.prim_func(private=True)
    def qkv_rotary_append(qkv_h: T.handle, cos_h: T.handle, sin_h: T.handle, kc_h: T.handle,
                          vc_h: T.handle, pst_h: T.handle, q_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap, cb, pn = T.int64(), T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")  # per row, or one for all
        qkv = T.match_buffer(qkv_h, (b, s, width), dtype)
        cos = T.match_buffer(cos_h, (cb, s, rot), dtype)
        sin = T.match_buffer(sin_h, (cb, s, rot), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        for bx in T.thread_binding((b * s * width + threads - 1) // threads,
                                   thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                P.wait(pdl)
                i: T.let[T.int64] = bx * threads + tx
                if i < b * s * width:
                    bi: T.let[T.int64] = i // (s * width)
                    si: T.let[T.int64] = i // width % s
                    j: T.let[T.int64] = i % width
                    c: T.let[T.int64] = j % d
                    ci: T.let[T.int64] = T.min(bi, cb - 1)
                    base: T.let[T.int64] = j - c
                    row: T.let[T.int64] = T.Cast("int64", pst[T.min(bi, pn - 1)]) + si
                    if j < hd:
                        q[bi, si, j] = rotate(qkv, bi, si, base, c, cos, sin, ci)
                    elif j < hd + kvd:
                        kc[bi, (j - hd) // d, row, c] = rotate(qkv, bi, si, base, c, cos, sin,
                                                               ci)
                    else:
                        vc[bi, (j - hd - kvd) // d, row, c] = qkv[bi, si, j]

    return qkv_rotary_append
