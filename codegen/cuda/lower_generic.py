"""CUDA lowerings of the ops outside the fused fast paths: LayerNorm, GELU, SiLU, GeGLU, the
generic element-wise ops and the data-movement / math ops an export may keep (Range, Slice,
Concat, MatMul, Softmax ...).

None is on a Llama-like graph's hot path; they exist so that every architecture that compiles
for the CPU compiles for CUDA. Floating-point math runs in float32 (kernels/te_fallback.py, TE
computes that FuseOps fuses and dlight schedules); the target-agnostic Relax lowerings of
kiln.codegen.lower_shapes are registered as they are. Registered into CUDA_LOWERINGS on import.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from kiln.codegen import lower_shapes as shapes
from kiln.codegen.cuda.kernels import te_fallback as tf
from kiln.codegen.cuda.lower import CUDA_LOWERINGS, CudaLowerContext, lowering
from kiln.codegen.lower import _numel, _static, dtype_of, reshape, shape_of
from kiln.codegen.lower_elementwise import _constant_exponent, _scalar
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import DType, Node

#: target-agnostic Relax lowerings, shared with the CPU table
for _op, _fn in {
    "Reshape": shapes._reshape, "Unsqueeze": shapes._reshape, "Squeeze": shapes._reshape,
    "Flatten": shapes._reshape, "Identity": shapes._identity, "Expand": shapes._expand,
    "Transpose": shapes._transpose, "Concat": shapes._concat, "Slice": shapes._slice,
    "Gather": shapes._gather, "Range": shapes._range, "ConstantOfShape": shapes._constant_of_shape,
    "Not": shapes._not, **dict.fromkeys(shapes._RELAX_BINARY, shapes._relax_binary),
}.items():
    CUDA_LOWERINGS[_op] = _fn

_FLOATS = ("float16", "bfloat16", "float32", "float64")
#: what an integer operand of a float32 math op lowers to (the float math is for floats)
_INT_UNARY = {"Neg": R.negative, "Abs": R.abs, "Relu": R.nn.relu}


def _is_float(x: relax.Expr) -> bool:
    return dtype_of(x) in _FLOATS


def _te(ctx: CudaLowerContext, fn, *args, **kw) -> relax.Expr:
    return ctx.bb.emit_te(fn, *args, **kw)


def _mapped(fn, name: str):
    """The TE function of one tensor that maps `fn` (float32) over it (emit_te takes tensors
    and scalars only, so the element function is bound here)."""
    def mapped(x):
        return tf.map_f32(fn, x, name=name)

    mapped.__name__ = name  # emit_te names the kernel after it
    return mapped


@lowering(*(op for op in tf.UNARY if op not in ("gelu", "gelu_tanh")))
def _unary(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    if not _is_float(x):
        if node.op in _INT_UNARY:
            return [ctx.bb.emit(_INT_UNARY[node.op](x))]
        raise KilnError(f"node {node.name} ({node.op}): no CUDA lowering for {dtype_of(x)} "
                        "inputs")
    return [_te(ctx, _mapped(tf.UNARY[node.op], node.op.lower()), x)]


@lowering("gelu")
def _gelu(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    fn = tf.UNARY["gelu_tanh" if node.attrs.get("approximate", "none") == "tanh" else "gelu"]
    return [_te(ctx, _mapped(fn, "gelu"), ctx.input(node, 0))]


@lowering("gelu_mul")
def _gelu_mul(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    gate, up = ctx.input(node, 0), ctx.input(node, 1)
    if [str(d) for d in shape_of(gate)] != [str(d) for d in shape_of(up)]:
        raise KilnError(f"node {node.name} (gelu_mul): gate and up must have the same shape")
    if dtype_of(up) != dtype_of(gate):
        up = ctx.bb.emit(R.astype(up, dtype_of(gate)))
    tanh = node.attrs.get("approximate", "none") == "tanh"
    return [_te(ctx, tf.gelu_mul, gate, up, tanh=tanh)]


@lowering("layer_norm")
def _layer_norm(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x, w, b = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    xs = shape_of(x)
    e = _static(xs[-1], "hidden size", node)
    y = _te(ctx, tf.layer_norm, reshape(ctx, x, [_numel(xs[:-1]), e]), w, b,
            float(node.attrs["eps"]))
    return [reshape(ctx, y, xs)]


@lowering("Clip")
def _clip(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    lo, hi = (_scalar(ctx, node, i, key) for i, key in ((1, "min"), (2, "max")))
    return [_te(ctx, tf.clip, ctx.input(node, 0), lo, hi)]


@lowering("Cast")
def _cast(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x, to = ctx.input(node, 0), node.attrs["to"]
    out = (to if isinstance(to, DType) else DType(to)).value
    if out == dtype_of(x):
        return [x]
    if out == "bool":
        return [ctx.bb.emit(R.not_equal(x, relax.const(0, dtype_of(x))))]
    return [ctx.bb.emit(R.astype(x, out))]


@lowering("Where")
def _where(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    c, a, b = (ctx.input(node, i) for i in range(3))
    if dtype_of(c) != "bool":
        c = ctx.bb.emit(R.not_equal(c, relax.const(0, dtype_of(c))))
    if dtype_of(b) != dtype_of(a):
        b = ctx.bb.emit(R.astype(b, dtype_of(a)))
    return [ctx.bb.emit(R.where(c, a, b))]


@lowering("Pow")
def _pow(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    exponent = _constant_exponent(ctx, node)
    if exponent is not None and _is_float(a):
        return [_te(ctx, tf.power, a, exponent)]
    return [ctx.bb.emit(R.power(a, b))]


def _in_f32(ctx: CudaLowerContext, x: relax.Expr) -> relax.Expr:
    return ctx.bb.emit(R.astype(x, "float32")) if dtype_of(x) in ("float16",
                                                                   "bfloat16") else x


def _back(ctx: CudaLowerContext, y: relax.Expr, dtype: str) -> relax.Expr:
    return ctx.bb.emit(R.astype(y, dtype)) if dtype_of(y) != dtype else y


@lowering("MatMul")
def _matmul(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    """A plain matmul (float32 accumulation for half operands), the result in a's dtype."""
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    acc = "float32" if dtype_of(a) in ("float16", "bfloat16") else dtype_of(a)
    if dtype_of(b) != dtype_of(a):
        b = ctx.bb.emit(R.astype(b, dtype_of(a)))
    return [_back(ctx, ctx.bb.emit(R.matmul(a, b, out_dtype=acc)), dtype_of(a))]


@lowering("Softmax")
def _softmax(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    y = ctx.bb.emit(R.nn.softmax(_in_f32(ctx, x), axis=int(node.attrs.get("axis", -1))))
    return [_back(ctx, y, dtype_of(x))]


@lowering("CumSum")
def _cumsum(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x = ctx.input(node, 0)
    axis = shapes._const(ctx, node, 1)
    axis = int(node.attrs["axis"] if axis is None else axis.reshape(-1)[0])
    if node.attrs.get("exclusive") or node.attrs.get("reverse"):
        raise KilnError(f"node {node.name} (CumSum): exclusive/reverse have no CUDA lowering")
    y = ctx.bb.emit(R.cumsum(_in_f32(ctx, x) if _is_float(x) else x, axis=axis))
    return [_back(ctx, y, dtype_of(x))]
