"""Generic element-wise maps of 1 to 3 same-shape flat inputs, each with its own dtype.

For the ONNX element-wise ops that recognition leaves in real models (Relu, Tanh, Clip, Cast,
Where, Pow, ...). Like elementwise.py's maps: `CHUNK`-element parallel tasks, `lanes`-wide vectors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

from tvm import tirx
from tvm.ir.expr import Expr as PrimExpr
from tvm.script import tirx as T

from kiln.codegen.kernels.elementwise import CHUNK

MapFn = Callable[..., PrimExpr]


@functools.cache
def map_kernel(fn: MapFn, in_dtypes: tuple[str, ...], out_dtype: str, *, lanes: int = 16,
               parallel: bool = True) -> tirx.PrimFunc:
    """PrimFunc(a0[n], ..., out[n]): out = fn(a0, ...) element-wise, for 1 to 3 inputs."""
    loop = T.parallel if parallel else T.serial

    @T.macro
    def flat(ins: Sequence, o, n):
        for c in loop((n + CHUNK - 1) // CHUNK):
            for v in range(T.min(CHUNK, n - c * CHUNK) // lanes):
                for lane in T.vectorized(lanes):
                    o[c * CHUNK + v * lanes + lane] = _apply(fn, ins, c * CHUNK + v * lanes + lane)
            for t in range(c * CHUNK + T.min(CHUNK, n - c * CHUNK) // lanes * lanes,
                           c * CHUNK + T.min(CHUNK, n - c * CHUNK)):
                o[t] = _apply(fn, ins, t)

    return _signature(len(in_dtypes), in_dtypes, out_dtype, flat)


def _apply(fn: MapFn, ins: Sequence[tirx.Buffer], i: PrimExpr) -> PrimExpr:
    return fn(*(a[i] for a in ins))


def _signature(arity: int, dts: tuple[str, ...], out_dtype: str, flat) -> tirx.PrimFunc:
    if arity == 1:

        @T.prim_func(private=True)
        def map1(a_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            n = T.int64()
            a = T.match_buffer(a_h, (n,), dts[0])
            o = T.match_buffer(o_h, (n,), out_dtype)
            flat([a], o, n)

        return map1
    if arity == 2:

        @T.prim_func(private=True)
        def map2(a_h: T.handle, b_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            n = T.int64()
            a = T.match_buffer(a_h, (n,), dts[0])
            b = T.match_buffer(b_h, (n,), dts[1])
            o = T.match_buffer(o_h, (n,), out_dtype)
            flat([a, b], o, n)

        return map2
    if arity == 3:

        @T.prim_func(private=True)
        def map3(a_h: T.handle, b_h: T.handle, c_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            n = T.int64()
            a = T.match_buffer(a_h, (n,), dts[0])
            b = T.match_buffer(b_h, (n,), dts[1])
            c = T.match_buffer(c_h, (n,), dts[2])
            o = T.match_buffer(o_h, (n,), out_dtype)
            flat([a, b, c], o, n)

        return map3
    raise ValueError(f"map_kernel: 1 to 3 inputs, got {arity}")
