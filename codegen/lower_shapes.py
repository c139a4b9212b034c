"""Lowerings of the generic data-movement and math ops a canonical graph may keep: Reshape and its
relatives, Expand, Transpose, Concat, Slice, Gather, Range, MatMul, Softmax and unary math.

These are not the hot path (a recognized transformer has none of them per layer, or only views);
they exist so that an architecture whose export keeps a few still compiles. Each maps onto the
Relax op of the same meaning, which TVM's LegalizeOps turns into a (plain) TIR kernel. Output
shapes come from kiln's type inference, so symbolic dims (batch, seq, past) flow through.
Registered into `kiln.codegen.lower.LOWERINGS` on import.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from tvm import relax, tirx
from tvm.relax import op as R

from kiln.codegen.kernels import fastmath
from kiln.codegen.lower import LowerContext, dtype_of, lowering, shape_of, to_prim
from kiln.codegen.lower_elementwise import _map
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node


def _out_shape(ctx: LowerContext, node: Node, i: int = 0) -> list[tirx.PrimExpr]:
    t = ctx.graph.types.get(node.outputs[i])
    if t is None or t.shape is None:
        raise KilnError(f"node {node.name} ({node.op}): output shape unknown, cannot lower")
    try:
        return [to_prim(d, ctx.symbols) for d in t.shape]
    except (KeyError, KilnError) as e:
        raise KilnError(f"node {node.name} ({node.op}): output shape {t.shape} is not "
                        "expressible in batch, seq and past") from e


def _const(ctx: LowerContext, node: Node, i: int) -> np.ndarray | None:
    name = node.inputs[i] if i < len(node.inputs) else ""
    if not name:
        return None
    if name not in ctx.graph.params:
        raise KilnError(f"node {node.name} ({node.op}): input {i} ({name}) must be a constant")
    return ctx.graph.params[name].load()


@lowering("Reshape", "Unsqueeze", "Squeeze", "Flatten")
def _reshape(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(R.reshape(ctx.input(node, 0), _out_shape(ctx, node)))]


@lowering("Identity")
def _identity(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.input(node, 0)]


@lowering("Expand")
def _expand(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(R.broadcast_to(ctx.input(node, 0), _out_shape(ctx, node)))]


@lowering("Transpose")
def _transpose(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    perm = node.attrs.get("perm")
    return [ctx.bb.emit(R.permute_dims(ctx.input(node, 0),
                                       None if perm is None else [int(p) for p in perm]))]


@lowering("Concat")
def _concat(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    parts = [ctx.values[v] for v in node.inputs if v]
    return [ctx.bb.emit(R.concat(parts, axis=int(node.attrs["axis"])))]


@lowering("Slice")
def _slice(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    rank = len(shape_of(x))
    if len(node.inputs) > 1 and any(node.inputs[1:]):
        starts, ends, axes, steps = (_const(ctx, node, i) for i in range(1, 5))
    else:
        starts, ends, axes, steps = (node.attrs.get(k) for k in ("starts", "ends", "axes",
                                                                   "steps"))
    axes = list(range(len(starts))) if axes is None else [int(a) % rank for a in axes]
    steps = [1] * len(axes) if steps is None else [int(s) for s in steps]
    dims = shape_of(x)

    def clamp(v, axis: int) -> tirx.PrimExpr:  # ONNX semantics: negative from the end, clamped
        v = to_prim(v, ctx.symbols) if not isinstance(v, (int, np.integer)) else int(v)
        if isinstance(v, int):
            if v < 0:
                return tirx.max(dims[axis] + v, 0)
            return tirx.min(tirx.const(min(v, 2**62), "int64"), dims[axis])
        return tirx.min(v, dims[axis])

    begin = [clamp(s, a) for s, a in zip(starts, axes, strict=True)]
    end = [clamp(e, a) for e, a in zip(ends, axes, strict=True)]
    if any(s != 1 for s in steps):
        raise KilnError(f"node {node.name} (Slice): steps {steps} have no CPU lowering")
    return [ctx.bb.emit(R.strided_slice(x, axes, begin, end, steps, assume_inbound=True))]


@lowering("Gather")
def _gather(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, idx = ctx.input(node, 0), ctx.input(node, 1)
    axis = int(node.attrs.get("axis", 0)) % len(shape_of(x))
    out = ctx.bb.emit(R.take(x, idx, axis=axis))
    return [ctx.bb.emit(R.reshape(out, _out_shape(ctx, node)))]


@lowering("Range")
def _range(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    if any(node.inputs):
        raise KilnError(f"node {node.name} (Range): bounds must be constant or symbolic "
                        "(computed at run time here)")
    a = node.attrs
    start, limit, delta = (to_prim(a[k], ctx.symbols) for k in ("start", "limit", "delta"))
    dtype = str(getattr(a["dtype"], "value", a["dtype"]))
    return [ctx.bb.emit(R.arange(relax.prim_value(start), relax.prim_value(limit),
                                 relax.prim_value(delta), dtype=dtype))]


@lowering("MatMul")
def _matmul(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(R.matmul(ctx.input(node, 0), ctx.input(node, 1)))]


@lowering("Softmax")
def _softmax(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(R.nn.softmax(ctx.input(node, 0), axis=int(node.attrs.get("axis", -1))))]


_RELAX_UNARY: dict[str, Callable[[relax.Expr], relax.Expr]] = {
    "Cos": R.cos, "Sin": R.sin, "Exp": R.exp, "Log": R.log, "Sqrt": R.sqrt, "Abs": R.abs,
    "Floor": R.floor, "Ceil": R.ceil,
}


@lowering(*_RELAX_UNARY)
def _relax_unary(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(_RELAX_UNARY[node.op](ctx.input(node, 0)))]


@lowering("Reciprocal")
def _reciprocal(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    return [ctx.bb.emit(R.divide(relax.const(1.0, dtype_of(x)), x))]


@lowering("gelu_mul")
def _gelu_mul(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    """gelu(gate) * up (GeGLU: Gemma, some T5s), element-wise over same-shaped operands."""
    gate, up = ctx.input(node, 0), ctx.input(node, 1)
    tanh = node.attrs.get("approximate", "none") == "tanh"
    gelu = fastmath.gelu_tanh if tanh else fastmath.gelu_erf
    if dtype_of(gate) != "float32":
        raise KilnError(f"node {node.name} (gelu_mul): no CPU kernel for {dtype_of(gate)}")
    return [_map(ctx, ("gelu_mul", tanh), lambda g, u: gelu(g) * u, [gate, up], "float32")]



_RELAX_BINARY: dict[str, Callable[[relax.Expr, relax.Expr], relax.Expr]] = {
    "Equal": R.equal, "Less": R.less, "LessOrEqual": R.less_equal, "Greater": R.greater,
    "GreaterOrEqual": R.greater_equal, "And": R.logical_and, "Or": R.logical_or,
    "Max": R.maximum, "Min": R.minimum, "Mod": R.floor_mod,
}


@lowering(*_RELAX_BINARY)
def _relax_binary(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    if node.op == "Mod" and node.attrs.get("fmod"):
        raise KilnError(f"node {node.name} (Mod): fmod=1 has no CPU lowering")
    return [ctx.bb.emit(_RELAX_BINARY[node.op](ctx.input(node, 0), ctx.input(node, 1)))]


@lowering("Not")
def _not(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(R.logical_not(ctx.input(node, 0)))]


@lowering("ConstantOfShape")
def _constant_of_shape(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    value = node.attrs.get("value")
    t = ctx.graph.types[node.outputs[0]]
    fill = np.asarray(value if value is not None else 0.0).reshape(-1)[0]
    return [ctx.bb.emit(R.full(_out_shape(ctx, node), relax.const(fill, t.dtype.value),
                               dtype=t.dtype.value))]


@lowering("CumSum")
def _cumsum(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    axis = _const(ctx, node, 1)
    axis = int(node.attrs["axis"] if axis is None else axis.reshape(-1)[0])
    if node.attrs.get("exclusive") or node.attrs.get("reverse"):
        raise KilnError(f"node {node.name} (CumSum): exclusive/reverse have no CPU lowering")
    return [ctx.bb.emit(R.cumsum(ctx.input(node, 0), axis=axis))]
