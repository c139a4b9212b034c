"""Memory-bound row kernels of the prefill, hand-scheduled TIR with 16-byte accesses (the
generic schedules dlight gives the same ops ran at about a quarter of the copy bandwidth):

- `swiglu_kernel`: y[m, f] = silu(gu[m, j]) * gu[m, f + j], the split of a fused gate/up
  projection and the SwiGLU in one pass (8 outputs per thread).
- `rms_norm_kernel`: y = x * rsqrt(mean(x^2) + eps) * w per row, one warp per row, the row held
  in registers between the sum of squares and the scaling (rows of 256 x 8 halves at most).
float32 arithmetic whatever the storage dtype.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

THREADS = 256
ROWS = 4  # rms_norm: rows (warps) per block


def vec_of(dtype: str) -> int:
    return 16 // {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]


def swiglu_supported(f: int, dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32") and f % vec_of(dtype) == 0


def rms_norm_supported(e: int, dtype: str) -> bool:
    return dtype in ("float16", "bfloat16", "float32") and e % (32 * vec_of(dtype)) == 0 \
        and e // (32 * vec_of(dtype)) <= 16


@functools.cache
def swiglu_kernel(f: int, dtype: str, threads: int = THREADS) -> tirx.PrimFunc:
    """PrimFunc(gu[m, 2f], y[m, f]): one 16-byte vector per thread, `threads` per block."""
    vec, f32 = vec_of(dtype), "float32"
    per_row = f // vec

    @T.prim_func(private=True)
    def swiglu(gu_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        gu = T.match_buffer(gu_h, (m, 2 * f), dtype)
        y = T.match_buffer(y_h, (m, f), dtype)
        for bx in T.thread_binding((m * per_row + threads - 1) // threads, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                # one local vector per tensor (see attention.py on TVM's codegen and reuse)
                gv = T.decl_buffer((vec,), dtype, scope="local")
                uv = T.decl_buffer((vec,), dtype, scope="local")
                ov = T.decl_buffer((vec,), dtype, scope="local")
                g = T.decl_buffer((1,), f32, scope="local")
                i: T.let[T.int64] = bx * threads + tx
                if i < m * per_row:
                    for j in T.vectorized(vec):
                        gv[j] = gu[i // per_row, i % per_row * vec + j]
                    for j in T.vectorized(vec):
                        uv[j] = gu[i // per_row, f + i % per_row * vec + j]
                    for j in T.unroll(vec):
                        g[0] = T.Cast(f32, gv[j])
                        ov[j] = T.Cast(dtype, g[0] / (T.float32(1) + T.exp(-g[0]))
                                       * T.Cast(f32, uv[j]))
                    for j in T.vectorized(vec):
                        y[i // per_row, i % per_row * vec + j] = ov[j]

    return swiglu


@functools.cache
def rms_norm_kernel(e: int, dtype: str, eps: float, rows: int = ROWS) -> tirx.PrimFunc:
    """PrimFunc(x[m, e], w[e], y[m, e]): one warp per row, `rows` rows per block."""
    vec, f32 = vec_of(dtype), "float32"
    per_lane = e // (32 * vec)  # vectors per lane

    @T.prim_func(private=True)
    def rms_norm_rows(x_h: T.handle, w: T.Buffer((e,), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, e), dtype)
        y = T.match_buffer(y_h, (m, e), dtype)
        for bx in T.thread_binding((m + rows - 1) // rows, thread="blockIdx.x"):
            for ty in T.thread_binding(rows, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    xr = T.decl_buffer((per_lane * vec,), dtype, scope="local")
                    wv = T.decl_buffer((vec,), dtype, scope="local")
                    ov = T.decl_buffer((vec,), dtype, scope="local")
                    ss = T.decl_buffer((1,), f32, scope="local")
                    if bx * rows + ty < m:  # warp-uniform
                        ss[0] = T.float32(0)
                        for p in T.unroll(per_lane):
                            for j in T.vectorized(vec):
                                xr[p * vec + j] = x[bx * rows + ty, (p * 32 + tx) * vec + j]
                        for p in T.unroll(per_lane * vec):
                            ss[0] += T.Cast(f32, xr[p]) * T.Cast(f32, xr[p])
                        for off in T.unroll(5):
                            ss[0] = ss[0] + T.tvm_warp_shuffle_xor(T.uint32(0xFFFFFFFF), ss[0],
                                                                   16 >> off, 32, 32)
                        ss[0] = T.rsqrt(ss[0] / T.float32(e) + T.float32(eps))
                        for p in T.unroll(per_lane):
                            for j in T.vectorized(vec):
                                wv[j] = w[(p * 32 + tx) * vec + j]
                            for j in T.unroll(vec):
                                ov[j] = T.Cast(dtype, T.Cast(f32, xr[p * vec + j]) * ss[0]
                                               * T.Cast(f32, wv[j]))
                            for j in T.vectorized(vec):
                                y[bx * rows + ty, (p * 32 + tx) * vec + j] = ov[j]

    return rms_norm_rows
