"""Decode GEMVs for 2..16 batch rows on the tensor cores (gemv.py branches to them; the
CUDA-core row buckets of gemv_rows.py where they do not apply).

With 2..16 rows, a row of weights times 16 rows of x is a skinny matrix product: mma.m16n8k16
does a warp's 16 rows x 8 outputs x 16 k in one instruction, where the CUDA cores (gemv_rows.py)
spend 16 x 8 x 16 / 32 = 64 FMAs (and the conversions); at 16 rows those instructions, not the
weight stream, would bound the step. A warp streams 8 weight rows (operand B: lane 4g + t loads
16 bytes of row g at k offset 8t of each 32-element step) and the block's warps split k; the
sum over k is order-free, so the 8 elements a lane loads are the logical k 2t + 8j + e of two
k16 steps (h = 0, 1: its elements 4h + 2j + e), and x (operand A, rows g and g + 8) is loaded
at the same physical k. fp32 accumulators; the warps' partial tiles are added in shared memory.
Fragment layouts: kernels/flash_attention.py's docstring.
"""

from __future__ import annotations

from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import pdl as P

#: the batched decode GEMVs on the tensor cores (fp16/bf16, k a multiple of 32); the benchmarks'
#: `nomma` variant clears it (gemv_rows.py's CUDA-core kernels, for an A/B run)
TENSOR_CORES = True
MMA_CHUNK = 8  # 32-element k-steps whose weights a lane loads before the first is used
PTX = {"float16": "fp16", "bfloat16": "bf16"}


def mma_warps(k: int, dtype: str) -> int:
    """Warps splitting k in the tensor-core kernels (each at least 8 steps of 32 elements
    where k allows), 0 where they do not apply (float32, k not a multiple of 32, disabled)."""
    if not TENSOR_CORES or dtype not in PTX or k % 32:
        return 0
    steps = k // 32
    return next(w for w in (8, 4, 2, 1) if steps % w == 0 and (steps // w >= 8 or w == 1))


def mma_rows(kind: str, n: int, k: int, dtype: str, out_dtype: str, *, eps: float = 0.0,
             pdl: bool = False, f: int = 0, pairs: int = 0, half: int = 0, d: int = 0,
             store_pair=None):
    """A macro(x, gamma, w, r, y, m, cos, sin, kc, vc, pst) (y: q_out for "qkv"), m rows 16 at
    a time, one block of mma_warps(k) warps per 8 outputs. `kind`: "plain", "residual"
    (y = x w + r), "norm" (x' = x * gamma, y scaled by rsqrt(mean(x^2) + eps)), "swiglu"
    (f outputs, weight rows r and f + r, normed), "qkv" (pairs of rows c, c + D/2 of each
    head, normed, rotated and stored by `store_pair`). Unused arguments may be None."""
    f32, vec, ch = "float32", 8, MMA_CHUNK
    ab = PTX[dtype]
    warps = mma_warps(k, dtype)
    part = k // warps
    steps = part // 32
    chunks = (steps + ch - 1) // ch
    pair = kind in ("swiglu", "qkv")
    norm = kind in ("norm", "swiglu", "qkv")
    outs = f if kind == "swiglu" else pairs if kind == "qkv" else n
    nacc = 8 if pair else 4
    red_n = nacc + 2  # a lane's accumulators and its two rows' sums of squares

    def mma(a, a_off, b, b_off, c, c_off):
        return T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, f32, a.data, a_off,
                                b.data, b_off, c.data, c_off, False, dtype=f32)

    @T.macro
    def weight_rows(ro, tile, g):
        """The weight rows lane group g streams for output tile `tile` (ro[0], ro[1])."""
        if kind == "qkv":
            ro[0] = T.Cast("int64", T.min(tile * 8 + g, pairs - 1) // half * d
                           + T.min(tile * 8 + g, pairs - 1) % half)
            ro[1] = ro[0] + half
        elif kind == "swiglu":
            ro[0] = T.Cast("int64", T.min(tile * 8 + g, f - 1))
            ro[1] = f + ro[0]
        else:
            ro[0] = T.Cast("int64", T.min(tile * 8 + g, n - 1))
            ro[1] = ro[0]

    @T.macro
    def epilogue(acc, ssq, one, r0, m, tile, g, t, gamma, r, y, cos, sin, kc, vc, pst, q):
        for i in T.unroll(2):
            for e in T.unroll(2):
                if r0 + g + 8 * i < m and tile * 8 + 2 * t + e < outs:
                    if norm:
                        one[2] = T.rsqrt(ssq[i] / T.float32(k) + T.float32(eps))
                    if kind == "plain":
                        y[r0 + g + 8 * i, tile * 8 + 2 * t + e] = T.Cast(out_dtype, acc[2 * i + e])
                    elif kind == "residual":
                        y[r0 + g + 8 * i, tile * 8 + 2 * t + e] = T.Cast(
                            out_dtype, acc[2 * i + e] + T.Cast(
                                f32, r[r0 + g + 8 * i, tile * 8 + 2 * t + e]))
                    elif kind == "norm":
                        y[r0 + g + 8 * i, tile * 8 + 2 * t + e] = T.Cast(
                            out_dtype, acc[2 * i + e] * one[2])
                    elif kind == "swiglu":
                        one[0] = acc[2 * i + e] * one[2]
                        y[r0 + g + 8 * i, tile * 8 + 2 * t + e] = T.Cast(
                            dtype, one[0] / (T.float32(1) + T.exp(-one[0])) * acc[4 + 2 * i + e]
                            * one[2])
                    else:  # qkv: the pair's two rows, rounded as the unfused output is
                        one[0] = T.Cast(f32, T.Cast(dtype, acc[2 * i + e] * one[2]))
                        one[1] = T.Cast(f32, T.Cast(dtype, acc[4 + 2 * i + e] * one[2]))
                        store_pair(one, cos, sin, kc, vc, pst, q,
                                   T.Cast("int64", r0 + g + 8 * i),
                                   T.Cast("int32", (tile * 8 + 2 * t + e) % half),
                                   T.Cast("int32", (tile * 8 + 2 * t + e) // half * d
                                          + (tile * 8 + 2 * t + e) % half))

    @T.macro
    def body(x, gamma, w, r, y, m, cos, sin, kc, vc, pst):
        for bx in T.thread_binding((outs + 7) // 8, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    red = T.decl_buffer((warps * 32 * red_n,), f32, scope="shared")
                    wa = T.decl_buffer((ch * vec,), dtype, scope="local")
                    wb = T.decl_buffer((ch * vec,), dtype, scope="local")
                    xv = T.decl_buffer((2 * vec,), dtype, scope="local")
                    gv = T.decl_buffer((vec,), dtype, scope="local")
                    af = T.decl_buffer((16,), dtype, scope="local")  # A of both k16 halves
                    # B of one step, copied from the 16-byte loads: TVM types a buffer written
                    # by vector loads as uint4, and the mma operand offset would count those
                    bf = T.decl_buffer((2 * vec,), dtype, scope="local")
                    acc = T.decl_buffer((nacc,), f32, scope="local")
                    ssq = T.decl_buffer((2,), f32, scope="local")
                    one = T.decl_buffer((3,), f32, scope="local")
                    ro = T.decl_buffer((2,), "int64", scope="local")
                    g: T.let[T.int32] = tx // 4
                    t: T.let[T.int32] = tx % 4
                    weight_rows(ro, bx, g)
                    for rg in range((m + 15) // 16):
                        for c in T.unroll(nacc):
                            acc[c] = T.float32(0)
                        ssq[0] = T.float32(0)
                        ssq[1] = T.float32(0)
                        for cb in range(chunks):
                            for it in T.unroll(ch):
                                if cb * ch + it < steps:
                                    for v in T.vectorized(vec):
                                        wa[it * vec + v] = w[ro[0], ty * part + (cb * ch + it)
                                                             * 32 + t * 8 + v]
                                    if pair:
                                        for v in T.vectorized(vec):
                                            wb[it * vec + v] = w[ro[1], ty * part + (
                                                cb * ch + it) * 32 + t * 8 + v]
                            if cb == 0:
                                P.wait(pdl)
                            for it in T.unroll(ch):
                                if cb * ch + it < steps:
                                    for i in T.unroll(2):
                                        if rg * 16 + g + 8 * i < m:
                                            for v in T.vectorized(vec):
                                                xv[i * vec + v] = x[rg * 16 + g + 8 * i, ty * part
                                                                    + (cb * ch + it) * 32
                                                                    + t * 8 + v]
                                        else:
                                            for v in T.vectorized(vec):
                                                xv[i * vec + v] = T.Cast(dtype, 0)
                                    if norm:
                                        for v in T.vectorized(vec):
                                            gv[v] = gamma[ty * part + (cb * ch + it) * 32
                                                          + t * 8 + v]
                                        for i in T.unroll(2):
                                            for v in T.unroll(vec):
                                                ssq[i] += T.Cast(f32, xv[i * vec + v]) * T.Cast(
                                                    f32, xv[i * vec + v])
                                                xv[i * vec + v] = T.Cast(dtype, T.Cast(
                                                    f32, xv[i * vec + v]) * T.Cast(f32, gv[v]))
                                    for h in T.unroll(2):
                                        for i in T.unroll(2):
                                            for j in T.unroll(2):
                                                for e in T.unroll(2):
                                                    af[h * 8 + 2 * i + 4 * j + e] = xv[
                                                        i * vec + h * 4 + 2 * j + e]
                                    for v in T.unroll(vec):
                                        bf[v] = wa[it * vec + v]
                                    if pair:
                                        for v in T.unroll(vec):
                                            bf[vec + v] = wb[it * vec + v]
                                    for h in T.unroll(2):
                                        mma(af, h * 8, bf, h * 4, acc, 0)
                                        if pair:
                                            mma(af, h * 8, bf, vec + h * 4, acc, 4)
                        for lvl in T.unroll(2):  # the 4 lanes of a row: its sum of squares
                            for i in T.unroll(2):
                                ssq[i] = ssq[i] + T.tvm_warp_shuffle_xor(
                                    T.uint32(0xFFFFFFFF), ssq[i], 1 << lvl, 32, 32)
                        if warps > 1:
                            for c in T.unroll(nacc):
                                red[(ty * 32 + tx) * red_n + c] = acc[c]
                            for i in T.unroll(2):
                                red[(ty * 32 + tx) * red_n + nacc + i] = ssq[i]
                            T.tvm_storage_sync("shared")
                            if ty == 0:
                                for wi in range(1, warps):
                                    for c in T.unroll(nacc):
                                        acc[c] += red[(wi * 32 + tx) * red_n + c]
                                    for i in T.unroll(2):
                                        ssq[i] += red[(wi * 32 + tx) * red_n + nacc + i]
                        if ty == 0:
                            epilogue(acc, ssq, one, rg * 16, m, bx, g, t, gamma, r, y, cos, sin,
                                     kc, vc, pst, y)
                        if warps > 1:
                            T.tvm_storage_sync("shared")

    return body
