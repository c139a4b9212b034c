"""Decode GEMV over 2:4 semi-structured sparse weights (`sparse_linear`, layout "nm", see
kiln.runtime.sparse_format), CUDA, hand-scheduled TIR: y[m, n] = x[m, :] . W[n, :] (+ res[m, n]),
optionally with the RMS norm of x in front, or the SwiGLU / q/k/v-rotary epilogues of the dense
decode kernels (kiln.codegen.cuda.kernels.gemv).

    values [N, K/2] fp16|bf16: the two kept entries of each group of 4 columns, in column order
    meta   [N, K/8] uint8: group g's nibble is (meta[n, g // 2] >> 4 (g % 2)) & 15; its bits 0-1
           and 2-3 are the columns (0-3) of the group's first and second value

A row is 1.125 bytes per column against 2 dense, and decode streams every row once per token, so
the kernel is a stream of those bytes: one warp per output row (or per pair of rows an epilogue
combines), each lane taking 32 columns per step, i.e. 32 bytes of values (two 16-byte loads) and
4 bytes of meta, several steps' loads issued before the first use. The block first stages x in
shared memory (normalized there when the norm is fused: the rms_norm kernel's output, computed
by the block), 16 bytes of padding per 32 columns so that a warp's 16-byte reads of its lanes'
chunks hit distinct banks. The two x values a group's pair multiplies are picked out of the
group's four halves by one byte permute (prmt), its selector computed from the nibble with
integer arithmetic (no divergent branch, no indexed register access): per pair of values one
prmt, four conversions and two FMAs, float32 accumulation, warp-shuffle row sums.

`nm_decompress_kernel` writes the dense weight for the prefill GEMM (kiln.codegen.cuda.
lower_sparse).
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import pdl as P

WARPS = 4  # warps per block
CHUNK = 32  # columns per lane and step: 16 values (32 bytes), 8 nibbles (4 bytes)
STRIDE = CHUNK + 8  # halves per chunk of x in shared memory (16 bytes of padding)
LOADS = 16  # 16-byte weight loads per lane issued before their first use (all of a 8192-column
# row: each group of loads is a full memory round trip)
MAX_K = 16384  # x of the block in shared memory: 40 KB at most


def supported(k: int, dtype: str) -> bool:
    """Whether the sparse decode GEMV covers rows of `k` columns in `dtype`."""
    return dtype in ("float16", "bfloat16") and k % CHUNK == 0 and 0 < k <= MAX_K


def _half(word, high: bool, dtype: str):
    """The low or high 16-bit half of a uint32 as a float32 (an fp16 or bf16 value)."""
    bits = T.shift_right(word, T.uint32(16)) if high else word
    return T.Cast("float32", T.reinterpret(dtype, T.Cast("uint16", bits)))


def _selectors(word, p):
    """prmt selectors for groups 2p (low 16 bits) and 2p + 1 (high 16 bits) of a meta word: for
    columns i0, i1 of a group (bytes 2i, 2i + 1 of the group's x words), 0x1010 + 0x22 i0 +
    0x2200 i1. The byte's four 2-bit fields are first spread into the four bytes of a word."""
    b = T.bitwise_and(T.shift_right(word, T.Cast("uint32", 8 * p)), T.uint32(0xFF))
    t = T.bitwise_or(b, T.shift_left(b, T.uint32(6)))
    t = T.bitwise_and(T.bitwise_or(t, T.shift_left(t, T.uint32(12))), T.uint32(0x03030303))
    return t * T.uint32(0x22) + T.uint32(0x10101010)


def byte_perm(a, b, sel):
    """CUDA's __byte_perm: the four bytes of (a, b) that the selector's nibbles pick."""
    return T.call_pure_extern("uint32", "__byte_perm", a, b, sel)


def _body(k: int, dtype: str, rows: int, warps: int, row_of, eps: float | None, pdl: bool,
          epilogue, wpb: int = WARPS, loads: int = LOADS):
    """The macro body(x, gamma, values, meta, m, o0..o5): warp w (of `warps`, `wpb` a block;
    `loads` 16-byte weight loads a lane issues together) computes
    acc[r] = x' . W[row_of(w, r)] for r < rows (x' = rmsnorm(x) * gamma with `eps`, else x) for
    every row mi of x, then runs epilogue(acc, mi, w, tx, o0..o5)."""
    f32, u32 = "float32", "uint32"
    nchunk = k // CHUNK
    steps = -(-nchunk // 32)  # per lane
    sg = max(1, min(steps, loads // (2 * rows)))  # steps whose loads are issued together
    groups = -(-steps // sg)
    nvec = k // 8  # 16-byte vectors of x
    per_thread = -(-nvec // (wpb * 32))

    @T.macro
    def load(values, meta, wv, mv, w, gi, tx):
        for s_ in T.unroll(sg):
            if (gi * sg + s_) * 32 + tx < nchunk:
                for r in T.unroll(rows):
                    for h in T.unroll(2):
                        wv[T.ramp(((r * sg + s_) * 2 + h) * 4, 1, 4)] = T.reinterpret(
                            "uint32x4", values[row_of(w, r), T.ramp(
                                ((gi * sg + s_) * 32 + tx) * 16 + h * 8, 1, 8)])
                    mv[r * sg + s_] = T.reinterpret("uint32", meta[row_of(w, r), T.ramp(
                        ((gi * sg + s_) * 32 + tx) * 4, 1, 4)])

    @T.macro
    def compute(xs, acc, wv, mv, xw, sel, gi, tx):
        for s_ in T.unroll(sg):
            if (gi * sg + s_) * 32 + tx < nchunk:
                for q in T.unroll(4):
                    xw[T.ramp(q * 4, 1, 4)] = T.reinterpret("uint32x4", xs[T.ramp(
                        ((gi * sg + s_) * 32 + tx) * STRIDE + q * 8, 1, 8)])
                for r in T.unroll(rows):
                    for p in T.unroll(4):  # meta byte p: groups 2p and 2p + 1
                        sel[0] = _selectors(mv[r * sg + s_], p)
                        for h in T.unroll(2):
                            sel[1] = byte_perm(xw[(2 * p + h) * 2], xw[(2 * p + h) * 2 + 1],
                                           T.shift_right(sel[0], T.Cast(u32, 16 * h)))
                            sel[2] = wv[(r * sg + s_) * 8 + 2 * p + h]
                            acc[r] += _half(sel[1], False, dtype) * _half(sel[2], False, dtype)
                            acc[r] += _half(sel[1], True, dtype) * _half(sel[2], True, dtype)

    @T.macro
    def stage(x, gamma, xs, xr, gr, red, ss, mi, ty, tx):
        """x[mi] (normalized with eps) into xs, chunk c at c * STRIDE; ends with a barrier."""
        if eps is None:
            for v in range(per_thread):
                if v * wpb * 32 + ty * 32 + tx < nvec:
                    xs[T.ramp((v * wpb * 32 + ty * 32 + tx) // 4 * STRIDE + (
                        v * wpb * 32 + ty * 32 + tx) % 4 * 8, 1, 8)] = x[mi, T.ramp(
                            (v * wpb * 32 + ty * 32 + tx) * 8, 1, 8)]
        else:
            ss[0] = T.float32(0)
            for v in T.unroll(per_thread):
                if v * wpb * 32 + ty * 32 + tx < nvec:
                    xr[T.ramp(v * 8, 1, 8)] = x[mi, T.ramp((v * wpb * 32 + ty * 32 + tx) * 8,
                                                           1, 8)]
                    # gamma with x: one memory round trip, not a second one after the sum
                    gr[T.ramp(v * 8, 1, 8)] = gamma[T.ramp((v * wpb * 32 + ty * 32 + tx) * 8,
                                                           1, 8)]
                    for j in T.unroll(8):
                        ss[0] += T.Cast(f32, xr[v * 8 + j]) * T.Cast(f32, xr[v * 8 + j])
            for off in T.unroll(5):
                ss[0] = ss[0] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), ss[0],
                                                        16 >> off, 32, 32)
            if tx == 0:
                red[ty] = ss[0]
            T.tvm_storage_sync("shared")
            ss[0] = T.float32(0)
            for t in T.unroll(wpb):
                ss[0] += red[t]
            ss[0] = T.rsqrt(ss[0] / T.float32(k) + T.float32(eps))
            for v in T.unroll(per_thread):
                if v * wpb * 32 + ty * 32 + tx < nvec:
                    for j in T.unroll(8):  # as the rms_norm kernel rounds its output
                        xr[v * 8 + j] = T.Cast(dtype, T.Cast(f32, xr[v * 8 + j]) * ss[0]
                                               * T.Cast(f32, gr[v * 8 + j]))
                    xs[T.ramp((v * wpb * 32 + ty * 32 + tx) // 4 * STRIDE + (
                        v * wpb * 32 + ty * 32 + tx) % 4 * 8, 1, 8)] = xr[T.ramp(v * 8, 1, 8)]
        T.tvm_storage_sync("shared")

    @T.macro
    def body(x, gamma, values, meta, m, o0, o1, o2, o3, o4, o5):
        for bx in T.thread_binding((warps + wpb - 1) // wpb, thread="blockIdx.x"):
            for ty in T.thread_binding(wpb, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    xs = T.decl_buffer((nchunk * STRIDE,), dtype, scope="shared")
                    red = T.decl_buffer((wpb,), f32, scope="shared")
                    acc = T.decl_buffer((rows + 1,), f32, scope="local")
                    wv = T.decl_buffer((rows * sg * 8,), u32, scope="local")
                    mv = T.decl_buffer((rows * sg,), u32, scope="local")
                    xw = T.decl_buffer((16,), u32, scope="local")
                    sel = T.decl_buffer((3,), u32, scope="local")
                    xr = T.decl_buffer((per_thread * 8,), dtype, scope="local")
                    gr = T.decl_buffer((per_thread * 8,), dtype, scope="local")
                    ss = T.decl_buffer((1,), f32, scope="local")
                    for mi in range(m):
                        if bx * wpb + ty < warps:  # the weights first: they wait for nothing
                            load(values, meta, wv, mv, bx * wpb + ty, 0, tx)
                        P.wait(pdl)
                        stage(x, gamma, xs, xr, gr, red, ss, mi, ty, tx)
                        if bx * wpb + ty < warps:
                            for r in T.unroll(rows):
                                acc[r] = T.float32(0)
                            for gi in range(groups):
                                if gi > 0:
                                    load(values, meta, wv, mv, bx * wpb + ty, gi, tx)
                                compute(xs, acc, wv, mv, xw, sel, gi, tx)
                            for off in T.unroll(5):
                                for r in T.unroll(rows):
                                    acc[r] = acc[r] + T.tvm_warp_shuffle_down(
                                        T.uint32(0xFFFFFFFF), acc[r], 16 >> off, 32, 32)
                            epilogue(acc, mi, bx * wpb + ty, tx, o0, o1, o2, o3, o4, o5)
                        T.tvm_storage_sync("shared")  # xs is rewritten for the next row of x

    return body


_ATTRS = {"tirx.is_scheduled": True, "tirx.noalias": True}


@functools.cache
def sparse_gemv_kernel(n: int, k: int, dtype: str, out_dtype: str, *, residual: bool = False,
                       norm_eps: float | None = None, pdl: bool = False, warps: int = WARPS,
                       loads: int = LOADS) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], (gamma[k],) values[n, k/2], meta[n, k/8], (res[m, n],) y[m, n]):
    `warps` (one per output row) a block, `loads` 16-byte weight loads in flight per lane."""
    if not supported(k, dtype):
        raise ValueError(f"sparse_gemv: k {k}, dtype {dtype} not supported")
    if residual and norm_eps is not None:
        raise ValueError("sparse_gemv: a fused norm and a fused residual together are not needed")
    f32 = "float32"

    @T.macro
    def store(acc, mi, w, tx, y, r, o2, o3, o4, o5):
        if tx == 0:
            if residual:
                y[mi, w] = T.Cast(out_dtype, acc[0] + T.Cast(f32, r[mi, w]))
            else:
                y[mi, w] = T.Cast(out_dtype, acc[0])

    body = _body(k, dtype, 1, n, lambda w, r: w, norm_eps, pdl, store, warps, loads)
    V, M = T.Buffer((n, k // 2), dtype), T.Buffer((n, k // 8), "uint8")
    if norm_eps is not None:
        @T.prim_func(private=True)
        def sparse_norm_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype), values: V, meta: M,
                             y_h: T.handle):
            T.func_attr(_ATTRS)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            y = T.match_buffer(y_h, (m, n), out_dtype)
            body(x, gamma, values, meta, m, y, None, None, None, None, None)
        return sparse_norm_gemv
    if residual:
        @T.prim_func(private=True)
        def sparse_gemv_residual(x_h: T.handle, values: V, meta: M, r_h: T.handle,
                                 y_h: T.handle):
            T.func_attr(_ATTRS)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            r = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n), out_dtype)
            body(x, None, values, meta, m, y, r, None, None, None, None)
        return sparse_gemv_residual

    @T.prim_func(private=True)
    def sparse_gemv(x_h: T.handle, values: V, meta: M, y_h: T.handle):
        T.func_attr(_ATTRS)
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), out_dtype)
        body(x, None, values, meta, m, y, None, None, None, None, None)
    return sparse_gemv


@functools.cache
def sparse_swiglu_gemv_kernel(f: int, k: int, dtype: str, eps: float, *, pdl: bool = False,
                              warps: int = WARPS, loads: int = LOADS) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], gamma[k], values[2f, k/2], meta[2f, k/8], y[m, f]): as
    gemv.swiglu_gemv_kernel, y[m, r] = silu(g) * u of g = x' . W[r], u = x' . W[f + r];
    `warps` (output pairs) a block, `loads` 16-byte loads in flight per lane."""
    if not supported(k, dtype):
        raise ValueError(f"sparse_swiglu_gemv: k {k}, dtype {dtype} not supported")

    @T.macro
    def store(acc, mi, w, tx, y, o1, o2, o3, o4, o5):
        if tx == 0:
            y[mi, w] = T.Cast(dtype, acc[0] / (T.float32(1) + T.exp(-acc[0])) * acc[1])

    body = _body(k, dtype, 2, f, lambda w, r: w + r * f, eps, pdl, store, warps, loads)

    @T.prim_func(private=True)
    def sparse_swiglu_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype),
                           values: T.Buffer((2 * f, k // 2), dtype),
                           meta: T.Buffer((2 * f, k // 8), "uint8"), y_h: T.handle):
        T.func_attr(_ATTRS)
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, f), dtype)
        body(x, gamma, values, meta, m, y, None, None, None, None, None)

    return sparse_swiglu_gemv


@functools.cache
def sparse_qkv_rope_gemv_kernel(heads: int, kv_heads: int, head_dim: int, k: int, dtype: str,
                                eps: float, *, pdl: bool = False, warps: int = WARPS,
                                loads: int = LOADS) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], gamma[k], values[n, k/2], meta[n, k/8], cos, sin, k_cache, v_cache,
    past[1], q_out[m, H D]) with n = (H + 2 KV) D: gemv.qkv_rope_gemv_kernel over sparse rows
    (the norm, the q/k/v projection, rotary on q and k, k and v into the caches at `past`);
    `warps` (rotary pairs) a block, `loads` 16-byte loads in flight per lane."""
    from kiln.codegen.cuda.kernels.gemv import rope_store

    if not supported(k, dtype):
        raise ValueError(f"sparse_qkv_rope_gemv: k {k}, dtype {dtype} not supported")
    d, half = head_dim, head_dim // 2
    n, hd = (heads + 2 * kv_heads) * head_dim, heads * head_dim
    store_pair = rope_store(heads, kv_heads, head_dim, dtype)

    @T.macro
    def store(acc, mi, w, tx, cos, sin, kc, vc, pst, q):
        if tx == 0:  # rounded to the storage dtype, as the unfused q/k/v output is
            acc[0] = T.Cast("float32", T.Cast(dtype, acc[0]))
            acc[1] = T.Cast("float32", T.Cast(dtype, acc[1]))
            store_pair(acc, cos, sin, kc, vc, pst, q, mi, w % half, w // half * d + w % half)

    body = _body(k, dtype, 2, n // 2, lambda w, r: w // half * d + w % half + r * half, eps,
                 pdl, store, warps, loads)

    @T.prim_func(private=True)
    def sparse_qkv_rope_gemv(x_h: T.handle, gamma: T.Buffer((k,), dtype),
                             values: T.Buffer((n, k // 2), dtype),
                             meta: T.Buffer((n, k // 8), "uint8"), cos_h: T.handle,
                             sin_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                             pst_h: T.handle, q_h: T.handle):
        T.func_attr(_ATTRS)
        m, cb, cap, pn = T.int64(), T.int64(), T.int64(), T.int64()
        pst = T.match_buffer(pst_h, (pn,), "int32")  # cached length: per row, or one for all
        x = T.match_buffer(x_h, (m, k), dtype)
        cos = T.match_buffer(cos_h, (cb, 1, d), dtype)
        sin = T.match_buffer(sin_h, (cb, 1, d), dtype)
        kc = T.match_buffer(kc_h, (m, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (m, kv_heads, cap, d), dtype)
        q = T.match_buffer(q_h, (m, hd), dtype)
        body(x, gamma, values, meta, m, cos, sin, kc, vc, pst, q)

    return sparse_qkv_rope_gemv


THREADS = 256  # nm_decompress: threads per block


@functools.cache
def nm_decompress_kernel(n: int, k: int, dtype: str) -> tirx.PrimFunc:
    """PrimFunc(values[n, k/2], meta[n, k/8], w[n, k]): the dense weight of a 2:4 one, for the
    prefill GEMM (a scratch weight): one thread per 32 columns of a row, 16-byte loads of
    values, 4 bytes of meta, four 16-byte stores; a column takes its group's first value, its
    second, or zero, by select."""
    if k % CHUNK:
        raise ValueError(f"nm_decompress: k {k} is not a multiple of {CHUNK}")
    per_row = k // CHUNK
    total = n * per_row

    @T.prim_func(private=True)
    def nm_decompress(values: T.Buffer((n, k // 2), dtype), meta: T.Buffer((n, k // 8), "uint8"),
                      w: T.Buffer((n, k), dtype)):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        for bx in T.thread_binding((total + THREADS - 1) // THREADS, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                vv = T.decl_buffer((16,), dtype, scope="local")
                ov = T.decl_buffer((32,), dtype, scope="local")
                mw = T.decl_buffer((1,), "uint32", scope="local")
                if bx * THREADS + tx < total:
                    for h in T.unroll(2):
                        for j in T.vectorized(8):
                            vv[h * 8 + j] = values[(bx * THREADS + tx) // per_row, (
                                bx * THREADS + tx) % per_row * 16 + h * 8 + j]
                    mw[0] = T.reinterpret("uint32", meta[(bx * THREADS + tx) // per_row, T.ramp(
                        (bx * THREADS + tx) % per_row * 4, 1, 4)])
                    for g in T.unroll(8):
                        for c in T.unroll(4):
                            ov[g * 4 + c] = T.Select(
                                T.bitwise_and(T.shift_right(mw[0], T.Cast("uint32", 4 * g)),
                                              T.uint32(3)) == T.Cast("uint32", c),
                                vv[g * 2], T.Select(
                                    T.bitwise_and(T.shift_right(mw[0], T.Cast(
                                        "uint32", 4 * g + 2)), T.uint32(3)) == T.Cast(
                                        "uint32", c), vv[g * 2 + 1], T.Cast(dtype, 0)))
                    for q in T.unroll(4):
                        for j in T.vectorized(8):
                            w[(bx * THREADS + tx) // per_row, (bx * THREADS + tx) % per_row * 32
                              + q * 8 + j] = ov[q * 8 + j]

    return nm_decompress
