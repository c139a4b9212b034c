"""Lowerings of generic element-wise ops: Relu, Tanh, Sigmoid, Neg, Erf, Clip, Cast, Where, Pow.

Same-shape operands map through kiln's flat `map_kernel`; broadcasting Where/Pow fall back to
TVM's legalized Relax ops. Registered into `kiln.codegen.lower.LOWERINGS` on import.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tvm import relax, tirx
from tvm.ir.expr import Expr as PrimExpr
from tvm.relax import op as R

from kiln.codegen.kernels import fastmath
from kiln.codegen.kernels.maps import map_kernel
from kiln.codegen.lower import LowerContext, _flat_map, dtype_of, lowering
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import DType, Node


def _unary_fns(dtype: str) -> dict[str, Callable[[PrimExpr], PrimExpr]]:
    one, zero = tirx.const(1.0, dtype), tirx.const(0.0, dtype)
    return {
        "Relu": lambda x: tirx.max(x, zero),
        "Tanh": fastmath.tanh,
        "Sigmoid": lambda x: one / (one + fastmath.fast_exp(-x)),
        "Neg": lambda x: -x,
        "Erf": tirx.erf,
    }


def _map(ctx: LowerContext, key: tuple, fn: Callable[..., PrimExpr], args: list[relax.Expr],
         out_dtype: str) -> relax.Expr:
    dts = tuple(dtype_of(a) for a in args)
    return _flat_map(ctx, (*key, dts, out_dtype), args,
                     lambda _, par: map_kernel(fn, dts, out_dtype, lanes=ctx.lanes,
                                               parallel=par),
                     out_dtype=out_dtype)


@lowering("Relu", "Tanh", "Sigmoid", "Neg", "Erf")
def _unary(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    dtype = dtype_of(x)
    if dtype not in ("float32", "float64") and node.op in ("Tanh", "Sigmoid", "Erf"):
        raise KilnError(f"node {node.name} ({node.op}): no CPU kernel for {dtype} inputs")
    fn = _unary_fns(dtype)[node.op]
    return [_map(ctx, ("map", node.op), fn, [x], dtype)]


@lowering("Clip")
def _clip(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    dtype = dtype_of(x)
    lo, hi = (_scalar(ctx, node, i, key) for i, key in ((1, "min"), (2, "max")))

    def fn(v: PrimExpr) -> PrimExpr:
        if lo is not None:
            v = tirx.max(v, tirx.const(lo, dtype))
        if hi is not None:
            v = tirx.min(v, tirx.const(hi, dtype))
        return v

    return [_map(ctx, ("clip", lo, hi), fn, [x], dtype)]


def _scalar(ctx: LowerContext, node: Node, i: int, attr: str) -> float | None:
    """Clip's bound: a constant input (opset >= 11) or an attribute (older opsets)."""
    name = node.inputs[i] if i < len(node.inputs) else ""
    if not name:
        value = node.attrs.get(attr)
        return None if value is None else float(value)
    if name not in ctx.graph.params:
        raise KilnError(f"node {node.name} (Clip): bound {name} must be a constant")
    return float(ctx.graph.params[name].load().reshape(-1)[0])


@lowering("Cast")
def _cast(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, to = ctx.input(node, 0), node.attrs["to"]
    out = (to if isinstance(to, DType) else DType(to)).value
    src = dtype_of(x)
    if out == src:
        return [x]
    if out == "bool":
        return [_map(ctx, ("cast", out), lambda v: v != tirx.const(0, src), [x], out)]
    return [_map(ctx, ("cast", out), lambda v: tirx.Cast(out, v), [x], out)]


@lowering("Where")
def _where(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    c, a, b = (ctx.input(node, i) for i in range(3))
    if not _same_shapes(ctx, node):
        cond = c if dtype_of(c) == "bool" else ctx.bb.emit(R.not_equal(c, relax.const(0,
                                                                                  dtype_of(c))))
        return [ctx.bb.emit(R.where(cond, a, b))]
    cdt = dtype_of(c)

    def fn(cv: PrimExpr, av: PrimExpr, bv: PrimExpr) -> PrimExpr:
        return tirx.Select(cv if cdt == "bool" else cv != tirx.const(0, cdt), av, bv)

    return [_map(ctx, ("where",), fn, [c, a, b], dtype_of(a))]


@lowering("Pow")
def _pow(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    exponent = _constant_exponent(ctx, node)
    dtype = dtype_of(a)
    if exponent is not None:  # x^2, x^3 ... as products (vectorized), else powf
        e = exponent
        whole = math.isfinite(e) and e == int(e) and 1 <= e <= 4
        fn = ((lambda v: _power(v, int(e))) if whole else
              (lambda v: tirx.power(v, tirx.const(e, dtype))))
        return [_map(ctx, ("pow", e), fn, [a], dtype)]
    if not _same_shapes(ctx, node):
        return [ctx.bb.emit(R.power(a, b))]
    return [_map(ctx, ("pow",), tirx.power, [a, b], dtype)]


def _power(v: PrimExpr, e: int) -> PrimExpr:
    out = v
    for _ in range(e - 1):
        out = out * v
    return out


def _constant_exponent(ctx: LowerContext, node: Node) -> float | None:
    name = node.inputs[1]
    if name in ctx.graph.params and ctx.graph.params[name].load().size == 1:
        return float(ctx.graph.params[name].load().reshape(-1)[0])
    return None


def _same_shapes(ctx: LowerContext, node: Node) -> bool:
    types = [ctx.graph.types.get(v) for v in node.inputs if v]
    return all(t is not None for t in types) and len({t.shape for t in types}) == 1
