"""Row-wise and element-wise TIR kernels: rms_norm, binary/unary maps, silu, embedding, rotary.

Tensors arrive flattened to 2-D rows [m, E] or 1-D [n] (m, n symbolic int64). Row kernels run one
row per parallel task; flat kernels split the data into `CHUNK`-element tasks vectorized by `lanes`.
`parallel=False` makes the outer loop serial: decode's one-token kernels are too small to pay for
waking the thread pool (about 5 us a launch here).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from tvm import tirx
from tvm.ir.expr import Expr as PrimExpr
from tvm.script import tirx as T

from kiln.codegen.kernels.fastmath import fast_exp, gelu_erf, gelu_tanh, sigmoid_times

CHUNK = 8192  # elements per parallel task of a flat map: big enough to amortize the launch

Unary = Callable[[PrimExpr], PrimExpr]
Binary = Callable[[PrimExpr, PrimExpr], PrimExpr]

BINARY: dict[str, Binary] = {
    "silu_mul": lambda gate, up: sigmoid_times(gate) * up,  # SwiGLU: silu(gate) * up
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
}
UNARY: dict[str, Unary] = {
    "silu": sigmoid_times,
    "Sigmoid": lambda x: tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") +
                                                       fast_exp(-x)),
    "Neg": lambda x: -x,
    "gelu": gelu_erf,
    "gelu_tanh": gelu_tanh,
}


@functools.cache
def binary_kernel(fn: Binary, *, lanes: int = 16, dtype: str = "float32",
                  parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(a[n], b[n], out[n]): out = fn(a, b) element-wise (same shapes)."""
    loop = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def binary(a_h: T.handle, b_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        a = T.match_buffer(a_h, (n,), dtype)
        b = T.match_buffer(b_h, (n,), dtype)
        o = T.match_buffer(o_h, (n,), dtype)
        for c in loop((n + CHUNK - 1) // CHUNK):
            for v in range(T.min(CHUNK, n - c * CHUNK) // lanes):
                for lane in T.vectorized(lanes):
                    o[c * CHUNK + v * lanes + lane] = fn(a[c * CHUNK + v * lanes + lane],
                                                         b[c * CHUNK + v * lanes + lane])
            for t in range(c * CHUNK + T.min(CHUNK, n - c * CHUNK) // lanes * lanes,
                           c * CHUNK + T.min(CHUNK, n - c * CHUNK)):
                o[t] = fn(a[t], b[t])

    return binary


@functools.cache
def unary_kernel(fn: Unary, *, lanes: int = 16, dtype: str = "float32",
                 parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(a[n], out[n]): out = fn(a) element-wise."""
    loop = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def unary(a_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int64()
        a = T.match_buffer(a_h, (n,), dtype)
        o = T.match_buffer(o_h, (n,), dtype)
        for c in loop((n + CHUNK - 1) // CHUNK):
            for v in range(T.min(CHUNK, n - c * CHUNK) // lanes):
                for lane in T.vectorized(lanes):
                    o[c * CHUNK + v * lanes + lane] = fn(a[c * CHUNK + v * lanes + lane])
            for t in range(c * CHUNK + T.min(CHUNK, n - c * CHUNK) // lanes * lanes,
                           c * CHUNK + T.min(CHUNK, n - c * CHUNK)):
                o[t] = fn(a[t])

    return unary


@functools.cache
def rms_norm_kernel(e: int, eps: float, *, lanes: int = 16,
                    dtype: str = "float32", parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(x[m, e], w[e], y[m, e]): y = x / sqrt(mean(x^2) + eps) * w, per row."""
    loop = T.parallel if parallel else T.serial
    ev, et = e // lanes, e % lanes

    @T.prim_func(private=True)
    def rms_norm(x_h: T.handle, w: T.Buffer((e,), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, e), dtype)
        y = T.match_buffer(y_h, (m, e), dtype)
        for r in loop(m):
            acc = T.decl_buffer((lanes,), "float32", scope="local")
            total = T.decl_buffer((1,), "float32", scope="local")
            for lane in T.vectorized(lanes):
                acc[lane] = T.float32(0)
            for v in range(ev):
                for lane in T.vectorized(lanes):
                    acc[lane] += x[r, v * lanes + lane] * x[r, v * lanes + lane]
            total[0] = T.float32(0)
            for lane in range(lanes):
                total[0] += acc[lane]
            for t in range(et):
                total[0] += x[r, ev * lanes + t] * x[r, ev * lanes + t]
            total[0] = T.float32(1) / T.sqrt(total[0] / T.float32(e) + T.float32(eps))
            for v in range(ev):
                for lane in T.vectorized(lanes):
                    y[r, v * lanes + lane] = x[r, v * lanes + lane] * total[0] * w[
                        v * lanes + lane]
            for t in range(et):
                y[r, ev * lanes + t] = x[r, ev * lanes + t] * total[0] * w[ev * lanes + t]

    return rms_norm


@functools.cache
def embedding_kernel(v: int, e: int, *, lanes: int = 16, dtype: str = "float32",
                     index_dtype: str = "int64", parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(table[v, e], ids[m], y[m, e]): y[i] = table[ids[i]] (ids clamped into range)."""
    loop = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def embedding(table: T.Buffer((v, e), dtype), ids_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        ids = T.match_buffer(ids_h, (m,), index_dtype)
        y = T.match_buffer(y_h, (m, e), dtype)
        for r in loop(m):
            row: T.let[T.int64] = T.max(T.min(T.Cast("int64", ids[r]), v - 1), 0)
            for c in range(e // lanes):
                for lane in T.vectorized(lanes):
                    y[r, c * lanes + lane] = table[row, c * lanes + lane]
            for t in range(e // lanes * lanes, e):
                y[r, t] = table[row, t]

    return embedding


@functools.cache
def packed_embedding_kernel(v: int, e: int, block: int, *, dtype: str = "float32",
                            index_dtype: str = "int64", parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(table[v / block, e, block], ids[m], y[m, e]): rows of a packed (tied) table.

    The table is a linear weight packed for the GEMM (see packed_linear); a row is a strided
    gather, which costs nothing next to keeping a second, unpacked copy of the weights.
    """
    loop = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def packed_embedding(table: T.Buffer((v // block, e, block), dtype), ids_h: T.handle,
                         y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        ids = T.match_buffer(ids_h, (m,), index_dtype)
        y = T.match_buffer(y_h, (m, e), dtype)
        for r in loop(m):
            row: T.let[T.int64] = T.max(T.min(T.Cast("int64", ids[r]), v - 1), 0)
            for c in range(e):
                y[r, c] = table[row // block, c, row % block]

    return packed_embedding


@functools.cache
def rotary_kernel(heads: int, head_dim: int, rot: int, *, interleaved: bool = False,
                  dtype: str = "float32", parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(x[b, s, H*D], cos[cb, s, R], sin[cb, s, R], y[b, s, H*D]); cb is b or 1.

    The first R dims of each head rotate (split halves, or interleaved pairs); the rest copy.
    """
    loop = T.parallel if parallel else T.serial
    hd, half = heads * head_dim, rot // 2

    @T.prim_func(private=True)
    def rotary(x_h: T.handle, cos_h: T.handle, sin_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cb = T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (b, s, hd), dtype)
        cos = T.match_buffer(cos_h, (cb, s, rot), dtype)
        sin = T.match_buffer(sin_h, (cb, s, rot), dtype)
        y = T.match_buffer(y_h, (b, s, hd), dtype)
        for bs in loop(b * s):
            bi: T.let[T.int64] = bs // s
            si: T.let[T.int64] = bs % s
            ci: T.let[T.int64] = T.min(bi, cb - 1)
            for h in range(heads):
                if interleaved:
                    for p in T.vectorized(half):
                        y[bi, si, h * head_dim + 2 * p] = (
                            x[bi, si, h * head_dim + 2 * p] * cos[ci, si, 2 * p]
                            - x[bi, si, h * head_dim + 2 * p + 1] * sin[ci, si, 2 * p])
                        y[bi, si, h * head_dim + 2 * p + 1] = (
                            x[bi, si, h * head_dim + 2 * p + 1] * cos[ci, si, 2 * p + 1]
                            + x[bi, si, h * head_dim + 2 * p] * sin[ci, si, 2 * p + 1])
                else:
                    for p in T.vectorized(half):
                        y[bi, si, h * head_dim + p] = (
                            x[bi, si, h * head_dim + p] * cos[ci, si, p]
                            - x[bi, si, h * head_dim + p + half] * sin[ci, si, p])
                        y[bi, si, h * head_dim + p + half] = (
                            x[bi, si, h * head_dim + p + half] * cos[ci, si, p + half]
                            + x[bi, si, h * head_dim + p] * sin[ci, si, p + half])
                for t in range(rot, head_dim):
                    y[bi, si, h * head_dim + t] = x[bi, si, h * head_dim + t]

    return rotary


@functools.cache
def layer_norm_kernel(e: int, eps: float, *, bias: bool, dtype: str = "float32",
                      parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(x[m, e], w[e], (b[e],) y[m, e]): (x - mean) / sqrt(var + eps) * w (+ b)."""
    loop = T.parallel if parallel else T.serial

    @T.macro
    def rows(x, w, b, y, m):
        for r in loop(m):
            st = T.decl_buffer((2,), "float32", scope="local")
            st[0] = T.float32(0)
            for c in range(e):
                st[0] += T.Cast("float32", x[r, c])
            st[0] = st[0] / T.float32(e)
            st[1] = T.float32(0)
            for c in range(e):
                st[1] += (T.Cast("float32", x[r, c]) - st[0]) * (T.Cast("float32", x[r, c]) -
                                                                 st[0])
            st[1] = T.float32(1) / T.sqrt(st[1] / T.float32(e) + T.float32(eps))
            for c in T.vectorized(e):
                if bias:
                    y[r, c] = T.Cast(dtype, (T.Cast("float32", x[r, c]) - st[0]) * st[1] * w[c]
                                     + b[c])
                else:
                    y[r, c] = T.Cast(dtype, (T.Cast("float32", x[r, c]) - st[0]) * st[1] * w[c])

    if bias:

        @T.prim_func(private=True)
        def layer_norm_bias(x_h: T.handle, w: T.Buffer((e,), dtype), b: T.Buffer((e,), dtype),
                            y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, e), dtype)
            y = T.match_buffer(y_h, (m, e), dtype)
            rows(x, w, b, y, m)

        return layer_norm_bias

    @T.prim_func(private=True)
    def layer_norm(x_h: T.handle, w: T.Buffer((e,), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, e), dtype)
        y = T.match_buffer(y_h, (m, e), dtype)
        rows(x, w, None, y, m)

    return layer_norm


@functools.cache
def last_position_kernel(e: int, *, dtype: str = "float32") -> tirx.PrimFunc:
    """PrimFunc(x[b, s, e], y[b, 1, e]): y[i, 0] = x[i, s - 1]."""

    @T.prim_func(private=True)
    def last_position(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s = T.int64(), T.int64()
        x = T.match_buffer(x_h, (b, s, e), dtype)
        y = T.match_buffer(y_h, (b, 1, e), dtype)
        for r in range(b):
            for c in T.vectorized(e):
                y[r, 0, c] = x[r, s - 1, c]

    return last_position


@functools.cache
def columns_kernel(n: int, start: int, width: int, *, dtype: str = "float32",
                   parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(x[m, n], y[m, width]): y = x[:, start:start+width] (one output of a Split)."""
    loop = T.parallel if parallel else T.serial

    @T.prim_func(private=True)
    def columns(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, n), dtype)
        y = T.match_buffer(y_h, (m, width), dtype)
        for r in loop(m):
            for c in T.vectorized(width):
                y[r, c] = x[r, start + c]

    return columns
