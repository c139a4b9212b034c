"""Vectorizable float32 math as TIR expressions (LLVM scalarizes llvm.exp into libm calls).

exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by a degree-6 Taylor polynomial
(relative error < 2e-7 on the reduced range) and 2^n built from the exponent bits.
"""

from __future__ import annotations

import math

from tvm import tirx
from tvm.ir.expr import Expr as PrimExpr

_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125  # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = 1.428606765330187e-06


def fast_exp(x: PrimExpr) -> PrimExpr:
    """e^x in float32 for any x (inputs below -87 flush to 0, above 88 saturate)."""
    f32 = "float32"
    x = tirx.max(tirx.min(x, tirx.const(88.0, f32)), tirx.const(-87.0, f32))
    n = tirx.floor(x * tirx.const(_LOG2E, f32) + tirx.const(0.5, f32))
    r = x - n * tirx.const(_LN2_HI, f32) - n * tirx.const(_LN2_LO, f32)
    p = tirx.const(1.0 / math.factorial(6), f32)
    for i in range(5, -1, -1):
        p = p * r + tirx.const(1.0 / math.factorial(i), f32)
    bits = tirx.shift_left(tirx.Cast("int32", n) + 127, 23)
    return p * tirx.reinterpret(f32, bits)


def sigmoid_times(x: PrimExpr) -> PrimExpr:
    """x * sigmoid(x) = x / (1 + e^-x): SiLU."""
    return x / (tirx.const(1.0, "float32") + fast_exp(-x))


def tanh(x: PrimExpr) -> PrimExpr:
    """tanh(x) = 1 - 2 / (e^2x + 1): exact at the extremes, vectorizable."""
    one = tirx.const(1.0, "float32")
    return one - tirx.const(2.0, "float32") / (fast_exp(x + x) + one)


def gelu_tanh(x: PrimExpr) -> PrimExpr:
    c, k = math.sqrt(2.0 / math.pi), 0.044715
    half = tirx.const(0.5, "float32")
    inner = tirx.const(c, "float32") * (x + tirx.const(k, "float32") * x * x * x)
    return half * x * (tirx.const(1.0, "float32") + tanh(inner))


def gelu_erf(x: PrimExpr) -> PrimExpr:
    """Exact GELU through libm's erf (scalar calls: GPT-2 style models only)."""
    half = tirx.const(0.5, "float32")
    return half * x * (tirx.const(1.0, "float32") +
                       tirx.erf(x * tirx.const(1.0 / math.sqrt(2.0), "float32")))
