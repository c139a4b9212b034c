"""Tensor-expression fallbacks for the CUDA target: ops outside the fused fast paths (LayerNorm,
GELU, SiLU, GeGLU, element-wise math), left unscheduled for FuseOps and dlight as te_ops.

Every op computes in float32 whatever the storage dtype (reductions accumulate in it) and casts
its result back to the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tvm import te, tirx
from tvm.ir.expr import Expr as PrimExpr

F32 = "float32"


def _f(v: float) -> PrimExpr:
    return tirx.const(v, F32)


def gelu(v: PrimExpr, *, tanh: bool) -> PrimExpr:
    """GELU of a float32 value: exact (erf) or the tanh approximation (gelu_new)."""
    if tanh:
        inner = _f(math.sqrt(2.0 / math.pi)) * (v + _f(0.044715) * v * v * v)
        return _f(0.5) * v * (_f(1.0) + tirx.tanh(inner))
    return _f(0.5) * v * (_f(1.0) + tirx.erf(v * _f(1.0 / math.sqrt(2.0))))


def sigmoid(v: PrimExpr) -> PrimExpr:
    return _f(1.0) / (_f(1.0) + tirx.exp(-v))


#: float32 functions of one float32 value, by kiln / ONNX op name
UNARY: dict[str, Callable[[PrimExpr], PrimExpr]] = {
    "Relu": lambda v: tirx.max(v, _f(0.0)),
    "Tanh": tirx.tanh,
    "Sigmoid": sigmoid,
    "Neg": lambda v: -v,
    "Erf": tirx.erf,
    "Cos": tirx.cos,
    "Sin": tirx.sin,
    "Exp": tirx.exp,
    "Log": tirx.log,
    "Sqrt": tirx.sqrt,
    "Abs": tirx.abs,
    "Floor": tirx.floor,
    "Ceil": tirx.ceil,
    "Reciprocal": lambda v: _f(1.0) / v,
    "silu": lambda v: v * sigmoid(v),
    "gelu": lambda v: gelu(v, tanh=False),
    "gelu_tanh": lambda v: gelu(v, tanh=True),
}


def map_f32(fn: Callable[..., PrimExpr], *xs: te.Tensor, name: str = "map") -> te.Tensor:
    """fn over same-shaped tensors, element by element, in float32; the first's dtype out."""
    def f(*i):
        return fn(*(x(*i).astype(F32) for x in xs)).astype(xs[0].dtype)

    return te.compute(xs[0].shape, f, name=name)


def gelu_mul(gate: te.Tensor, up: te.Tensor, *, tanh: bool) -> te.Tensor:
    """gelu(gate) * up (GeGLU) in float32."""
    return map_f32(lambda g, u: gelu(g, tanh=tanh) * u, gate, up, name="gelu_mul")


def clip(x: te.Tensor, lo: float | None, hi: float | None) -> te.Tensor:
    def f(*i):
        v = x(*i)
        if lo is not None:
            v = tirx.max(v, tirx.const(lo, x.dtype))
        if hi is not None:
            v = tirx.min(v, tirx.const(hi, x.dtype))
        return v

    return te.compute(x.shape, f, name="clip")


def power(x: te.Tensor, exponent: float) -> te.Tensor:
    """x ** exponent (a constant): small whole powers as products, else powf, in float32."""
    whole = math.isfinite(exponent) and exponent == int(exponent) and 1 <= exponent <= 4

    def fn(v: PrimExpr) -> PrimExpr:
        if not whole:
            return tirx.power(v, _f(exponent))
        out = v
        for _ in range(int(exponent) - 1):
            out = out * v
        return out

    return map_f32(fn, x, name="power")


def layer_norm(x: te.Tensor, w: te.Tensor | None, b: te.Tensor | None,
               eps: float) -> te.Tensor:
    """(x - mean) / sqrt(var + eps) * w + b per row of x[m, e]; mean and variance (two
    passes) in float32."""
    m, e = x.shape
    inv = _f(1.0 / int(e))
    r1 = te.reduce_axis((0, e), name="e1")
    total = te.compute((m,), lambda i: te.sum(x[i, r1].astype(F32), axis=r1), name="ln_sum")
    r2 = te.reduce_axis((0, e), name="e2")

    def centred(i, j):
        return x[i, j].astype(F32) - total[i] * inv

    ss = te.compute((m,), lambda i: te.sum(centred(i, r2) * centred(i, r2), axis=r2),
                    name="ln_sum_sq")

    def f(i, j):
        y = centred(i, j) * tirx.rsqrt(ss[i] * inv + _f(eps))
        if w is not None:
            y = y * w[j].astype(F32)
        if b is not None:
            y = y + b[j].astype(F32)
        return y.astype(x.dtype)

    return te.compute((m, e), f, name="layer_norm")

