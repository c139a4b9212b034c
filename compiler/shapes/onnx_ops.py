"""Type rules for the ONNX-level (generic) ops: output dtypes and symbolic shapes.

Rules read known input values (`values[i]`: numpy arrays, or object arrays of dims for shape
tensors) to size Reshape, Expand, ConstantOfShape, Range, Slice, Tile, Pad, Split, TopK and the
reductions exactly. When a value is unknown the rule still gives the rank where it can, with fresh
unknown dims (`unknown_dim()`: symbols `unk1`, `unk2`, ... that no graph input binds). The folded
attribute forms documented in kiln.compiler.interpreter.onnx_ops are read too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import sympy

from kiln.compiler.interpreter.onnx_ops import (
    reshape_target,
    slice_bounds,
    slice_params,
    split_sizes,
)
from kiln.compiler.ir import Dim, DType, Node, Shape, TensorType, sym
from kiln.compiler.shapes import broadcast, dims_equal, fail, rule

Types = Sequence[TensorType | None]
Values = Sequence[np.ndarray | None]

UNKNOWN_PREFIX = "unk"
_unknowns = itertools.count(1)


def unknown_dim() -> sympy.Symbol:
    """A fresh dim nothing is known about (named unk1, unk2, ...)."""
    return sym(f"{UNKNOWN_PREFIX}{next(_unknowns)}")


def unknown_shape(rank: int | None) -> Shape | None:
    return None if rank is None else tuple(unknown_dim() for _ in range(rank))


def is_unknown(d: Dim) -> bool:
    """Whether a dim involves an unknown symbol (so it cannot be baked into an attribute)."""
    return not isinstance(d, int) and any(s.name.startswith(UNKNOWN_PREFIX)
                                          for s in d.free_symbols)


def same_dim(a: Dim, b: Dim) -> bool | None:
    """dims_equal with a fast path for the common identical and integer cases."""
    if a is b or a == b:
        return True
    if isinstance(a, int) and isinstance(b, int):
        return False
    return dims_equal(a, b)


def bcast(node: Node, *shapes: Shape | None) -> Shape | None:
    """Broadcast shapes (None when any is unknown), cheap when dims are identical or 1."""
    if any(s is None for s in shapes):
        return None
    rank = max(len(s) for s in shapes)
    out: list[Dim] = []
    for dims in zip(*[(1,) * (rank - len(s)) + tuple(s) for s in shapes], strict=True):
        real = [d for d in dims if d != 1]
        if real and any(d != real[0] for d in real[1:]):
            return broadcast(node, *shapes)  # the careful path: decides or raises
        out.append(real[0] if real else 1)
    return tuple(out)


def _get(seq: Sequence, i: int):
    return seq[i] if i < len(seq) else None


def _ints(v: np.ndarray | None) -> tuple | None:
    """The values of an integer input (shape, axes, indices) as a tuple; a non-integer one is
    refused (ValueError: infer reports it as the node's)."""
    if v is None:
        return None
    v = np.asarray(v)  # integers, or objects: ints and symbolic dims
    if v.dtype.kind in "fc" or any(isinstance(x, float) for x in np.ravel(v)):
        raise ValueError(f"an input that holds shape, axes or indices is {v.dtype}, not integer")
    return tuple(int(x) if isinstance(x, int | np.integer) else x for x in np.ravel(v))


def _axes(node: Node, values: Values, i: int) -> tuple | None:
    """Axes from input i when known, else the attribute; "missing" when the input is unknown."""
    if i < len(node.inputs) and node.inputs[i]:
        return _ints(values[i]) if values[i] is not None else "missing"
    return node.attrs.get("axes")


def _pos(node: Node, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise fail(node, f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def _t(dtype: DType, shape: Shape | None) -> TensorType:
    return TensorType(dtype, None if shape is None else tuple(shape))


def _prod(dims: Sequence[Dim]) -> Dim:
    p = math.prod(dims)
    return int(p) if isinstance(p, int | sympy.Integer) else p


# ---------------------------------------------------------------------------------------------
# elementwise

_SAME = ("Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Relu",
         "Cos", "Sin", "Tan", "Floor", "Ceil", "Sign", "Round", "Softplus", "Mish", "Identity",
         "Clip", "LeakyRelu", "Elu", "HardSigmoid", "HardSwish", "Gelu", "Softmax",
         "LogSoftmax", "CumSum", "Trilu", "RMSNormalization", "RotaryEmbedding",
         "com.microsoft.Gelu", "com.microsoft.FastGelu", "com.microsoft.QuickGelu")


@rule(*_SAME)
def same(node, types, values):
    return [types[0]]


@rule("Not", "IsNaN", "IsInf")
def predicate(node, types, values):
    return [_t(DType.bool, types[0].shape)]


@rule("Add", "Sub", "Mul", "Div", "Pow", "Mod", "And", "Or", "Xor", "BitwiseAnd", "BitwiseOr",
      "Min", "Max", "Sum", "Mean", "com.microsoft.BiasGelu")
def elementwise(node, types, values):
    present = [t for t in types if t is not None]
    return [_t(present[0].dtype, bcast(node, *(t.shape for t in present)))]


@rule("Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual")
def compare(node, types, values):
    return [_t(DType.bool, bcast(node, types[0].shape, types[1].shape))]


@rule("Where")
def where(node, types, values):
    cond, a, b = types
    return [_t(a.dtype, bcast(node, cond.shape, a.shape, b.shape))]


@rule("Cast")
def cast(node, types, values):
    return [_t(node.attrs["to"], types[0].shape)]


@rule("CastLike")
def cast_like(node, types, values):
    return [_t(types[1].dtype, types[0].shape)]


@rule("Dropout")
def dropout(node, types, values):
    return [types[0], _t(DType.bool, types[0].shape)]


# ---------------------------------------------------------------------------------------------
# matrix products


@rule("MatMul")
def matmul(node, types, values):
    a, b = types
    if a.shape is None or b.shape is None:
        return [_t(a.dtype, None)]
    sa = (1, *a.shape) if len(a.shape) == 1 else a.shape
    sb = (*b.shape, 1) if len(b.shape) == 1 else b.shape
    if same_dim(sa[-1], sb[-2]) is False:
        raise fail(node, "inner dimensions differ", a, b)
    out = (*bcast(node, sa[:-2], sb[:-2]), sa[-2], sb[-1])
    if len(a.shape) == 1:
        out = out[:-2] + out[-1:]
    if len(b.shape) == 1:
        out = out[:-1]
    return [_t(a.dtype, out)]


@rule("Gemm")
def gemm(node, types, values):
    a, b = types[0], types[1]
    if a.shape is None or b.shape is None:
        return [_t(a.dtype, (unknown_dim(), unknown_dim()))]
    m, ka = reversed(a.shape) if node.attrs.get("transA", 0) else a.shape
    kb, n = reversed(b.shape) if node.attrs.get("transB", 0) else b.shape
    if same_dim(ka, kb) is False:
        raise fail(node, "inner dimensions differ", a, b)
    return [_t(a.dtype, (m, n))]


@rule("Einsum")
def einsum(node, types, values):
    eq = node.attrs["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    if "..." in eq or any(t.shape is None for t in types):
        return [_t(types[0].dtype, None)]
    sizes: dict[str, Dim] = {}
    for term, t in zip(lhs.split(","), types, strict=True):
        for letter, d in zip(term, t.shape, strict=True):
            if letter in sizes and 1 not in (sizes[letter], d) and \
                    same_dim(sizes[letter], d) is False:
                raise fail(node, f"label {letter} has different sizes", *types)
            if letter not in sizes or sizes[letter] == 1:
                sizes[letter] = d
    if not _:
        rhs = "".join(sorted(c for c in set(lhs) - {","} if lhs.count(c) == 1))
    return [_t(types[0].dtype, tuple(sizes[c] for c in rhs))]


# ---------------------------------------------------------------------------------------------
# shapes and layout


@rule("Shape")
def shape(node, types, values):
    rank = types[0].rank
    if rank is None:
        return [_t(DType.i64, (unknown_dim(),))]
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    return [_t(DType.i64, (len(range(rank)[start:end]),))]


@rule("Size")
def size(node, types, values):
    return [_t(DType.i64, ())]


def _count_check(node: Node, x: TensorType, out: Shape) -> None:
    if x.shape is None or any(is_unknown(d) for d in (*x.shape, *out)):
        return
    if same_dim(_prod(x.shape), _prod(out)) is False:
        raise fail(node, f"cannot reshape to {list(out)}: element counts differ", x)


@rule("Reshape")
def reshape(node, types, values):
    x = types[0]
    if _get(node.inputs, 1):
        target = _ints(values[1])
        if target is None:
            n = _get(types, 1).shape
            return [_t(x.dtype, unknown_shape(n[0] if n and isinstance(n[0], int) else None))]
        if x.shape is None and any(d in (0, -1) for d in target):
            return [_t(x.dtype, tuple(unknown_dim() if d in (0, -1) else d for d in target))]
        out = reshape_target(x.shape or (), target, bool(node.attrs.get("allowzero", 0)))
    else:
        out = tuple(node.attrs["shape"])
    _count_check(node, x, out)
    return [_t(x.dtype, out)]


@rule("Flatten")
def flatten(node, types, values):
    x = types[0]
    if x.shape is None:
        return [_t(x.dtype, unknown_shape(2))]
    axis = node.attrs.get("axis", 1)
    axis = axis + len(x.shape) if axis < 0 else axis
    return [_t(x.dtype, (_prod(x.shape[:axis]), _prod(x.shape[axis:])))]


@rule("Squeeze")
def squeeze(node, types, values):
    x = types[0]
    axes = _axes(node, values, 1)
    if x.shape is None or axes == "missing":
        return [_t(x.dtype, None)]
    if axes is None:
        if not all(isinstance(d, int) for d in x.shape):
            return [_t(x.dtype, None)]
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    drop = {_pos(node, a, len(x.shape)) for a in axes}
    for a in drop:
        if same_dim(x.shape[a], 1) is False:
            raise fail(node, f"cannot squeeze axis {a}", x)
    return [_t(x.dtype, tuple(d for i, d in enumerate(x.shape) if i not in drop))]


@rule("Unsqueeze")
def unsqueeze(node, types, values):
    x = types[0]
    axes = _axes(node, values, 1)
    if x.shape is None or axes in ("missing", None):
        return [_t(x.dtype, None)]
    rank = len(x.shape) + len(axes)
    new = {_pos(node, a, rank) for a in axes}
    rest = iter(x.shape)
    return [_t(x.dtype, tuple(1 if i in new else next(rest) for i in range(rank)))]


@rule("Transpose")
def transpose(node, types, values):
    x = types[0]
    if x.shape is None:
        return [x]
    perm = node.attrs.get("perm") or tuple(reversed(range(len(x.shape))))
    if sorted(perm) != list(range(len(x.shape))):
        raise fail(node, f"perm {list(perm)} does not match the rank", x)
    return [_t(x.dtype, tuple(x.shape[p] for p in perm))]


@rule("Expand")
def expand(node, types, values):
    x = types[0]
    if not _get(node.inputs, 1):
        return [_t(x.dtype, tuple(node.attrs["shape"]))]
    target = _ints(values[1])
    if target is None:
        n = types[1].shape
        if not n or not isinstance(n[0], int) or x.shape is None:
            return [_t(x.dtype, None)]
        target = tuple(unknown_dim() for _ in range(n[0]))
        rank = max(n[0], len(x.shape))
        padded = (1,) * (rank - len(x.shape)) + tuple(x.shape)
        tpad = (1,) * (rank - n[0]) + target
        return [_t(x.dtype, tuple(t if xd == 1 else xd for xd, t in zip(padded, tpad,
                                                                        strict=True)))]
    return [_t(x.dtype, bcast(node, x.shape, target))]


@rule("Concat")
def concat(node, types, values):
    present = [t for t in types if t is not None]
    known = [t for t in present if t.shape is not None]
    if len(known) < len(present):
        return [_t(present[0].dtype, unknown_shape(known[0].rank) if known else None)]
    rank = len(known[0].shape)
    if any(len(t.shape) != rank for t in known):
        raise fail(node, "inputs have different ranks", *known)
    axis = _pos(node, node.attrs["axis"], rank)
    out = list(known[0].shape)
    for t in known[1:]:
        for i, d in enumerate(t.shape):
            if i != axis and same_dim(out[i], d) is False:
                raise fail(node, f"inputs differ on axis {i}", *known)
    out[axis] = _dim(sum(sympy.sympify(t.shape[axis]) for t in known))
    return [_t(present[0].dtype, tuple(out))]


@rule("Split")
def split(node, types, values):
    x = types[0]
    n = len(node.outputs)
    if x.shape is None:
        return [_t(x.dtype, None)] * n
    axis = _pos(node, node.attrs.get("axis", 0), len(x.shape))
    if _get(node.inputs, 1) and values[1] is None:
        sizes = tuple(unknown_dim() for _ in range(n))
    else:
        sizes = split_sizes(x.shape[axis], [None, _get(values, 1)], node.attrs, n)
    return [_t(x.dtype, (*x.shape[:axis], s, *x.shape[axis + 1:])) for s in sizes]


def _slice_len(dim: Dim, start: Dim, end: Dim, step: Dim) -> Dim:
    """Length of an ONNX slice; symbolic bounds are assumed to lie within the axis."""
    if all(isinstance(v, int) for v in (dim, start, end, step)):
        return len(range(dim)[slice_bounds(start, end, step, dim)])
    if step != 1:
        return unknown_dim()
    start = dim + start if isinstance(start, int) and start < 0 else start
    end = dim + end if isinstance(end, int) and end < 0 else end
    if isinstance(end, int) and end >= 2**31:
        end = dim
    length = sympy.sympify(end) - sympy.sympify(start)
    return int(length) if length.is_Integer else length


@rule("Slice")
def slice_(node, types, values):
    x = types[0]
    if x.shape is None:
        return [x]
    rank = len(x.shape)
    if len(node.inputs) > 1 and any(node.inputs[i] and values[i] is None
                                    for i in range(1, len(node.inputs))):
        return [_t(x.dtype, unknown_shape(rank))]
    out = list(x.shape)
    for axis, start, end, step in slice_params(list(values), node.attrs, rank):
        out[axis] = _slice_len(x.shape[axis], start, end, step)
    return [_t(x.dtype, tuple(out))]


@rule("Gather")
def gather(node, types, values):
    x, idx = types
    if not idx.dtype.is_int:
        raise fail(node, "indices must be integers", x, idx)
    if x.shape is None or idx.shape is None:
        return [_t(x.dtype, None)]
    axis = _pos(node, node.attrs.get("axis", 0), len(x.shape))
    return [_t(x.dtype, (*x.shape[:axis], *idx.shape, *x.shape[axis + 1:]))]


@rule("GatherElements")
def gather_elements(node, types, values):
    return [_t(types[0].dtype, types[1].shape)]


@rule("GatherND")
def gather_nd(node, types, values):
    x, idx = types
    if x.shape is None or idx.shape is None or not isinstance(idx.shape[-1], int):
        return [_t(x.dtype, None)]
    b = node.attrs.get("batch_dims", 0)
    return [_t(x.dtype, (*idx.shape[:-1], *x.shape[b + idx.shape[-1]:]))]


@rule("ScatterND", "ScatterElements")
def scatter(node, types, values):
    return [types[0]]


@rule("Tile")
def tile(node, types, values):
    x = types[0]
    reps = _ints(values[1]) if _get(node.inputs, 1) else node.attrs["repeats"]
    if x.shape is None:
        return [x]
    if reps is None:
        return [_t(x.dtype, unknown_shape(len(x.shape)))]
    return [_t(x.dtype, tuple(_prod((d, r)) for d, r in zip(x.shape, reps, strict=True)))]


@rule("Pad")
def pad(node, types, values):
    x = types[0]
    if x.shape is None:
        return [x]
    rank = len(x.shape)
    pads = _ints(values[1]) if _get(node.inputs, 1) else node.attrs.get("pads")
    axes = _axes(node, values, 3) if _get(node.inputs, 3) else tuple(range(rank))
    if pads is None or axes == "missing":
        return [_t(x.dtype, unknown_shape(rank))]
    out = list(x.shape)
    for i, a in enumerate(axes):
        a = _pos(node, a, rank)
        out[a] = _dim(sympy.sympify(out[a]) + pads[i] + pads[i + len(axes)])
    return [_t(x.dtype, tuple(out))]


@rule("ConstantOfShape")
def constant_of_shape(node, types, values):
    dtype = node.attrs.get("dtype", DType.f32)
    if not _get(node.inputs, 0):
        return [_t(dtype, tuple(node.attrs["shape"]))]
    dims = _ints(values[0])
    if dims is None:
        n = types[0].shape
        return [_t(dtype, unknown_shape(n[0] if n and isinstance(n[0], int) else None))]
    return [_t(dtype, dims)]


@rule("Range")
def range_(node, types, values):
    if not _get(node.inputs, 0):
        a = node.attrs
        start, limit, delta, dtype = a["start"], a["limit"], a["delta"], a["dtype"]
    else:
        dtype = types[0].dtype
        if any(v is None for v in values[:3]):
            return [_t(dtype, (unknown_dim(),))]
        start, limit, delta = (np.ravel(v)[0] for v in values[:3])
    n = sympy.ceiling((sympy.sympify(limit) - sympy.sympify(start)) / sympy.sympify(delta))
    if n.is_number:
        return [_t(dtype, (max(int(n), 0),))]
    return [_t(dtype, (n,))]


@rule("EyeLike")
def eye_like(node, types, values):
    return [_t(node.attrs.get("dtype") or types[0].dtype, types[0].shape)]


@rule("NonZero")
def non_zero(node, types, values):
    x = types[0]
    return [_t(DType.i64, (x.rank if x.rank is not None else unknown_dim(), unknown_dim()))]


# ---------------------------------------------------------------------------------------------
# reductions and normalizations


def _reduced(node: Node, x: TensorType, axes: tuple | None, keep: bool) -> Shape | None:
    if x.shape is None:
        return None
    rank = len(x.shape)
    if axes == "missing":
        return unknown_shape(rank) if keep else None
    if not axes:
        if node.attrs.get("noop_with_empty_axes", 0):
            return x.shape
        axes = range(rank)
    drop = {_pos(node, a, rank) for a in axes}
    if keep:
        return tuple(1 if i in drop else d for i, d in enumerate(x.shape))
    return tuple(d for i, d in enumerate(x.shape) if i not in drop)


@rule("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceSumSquare",
      "ReduceL2", "ReduceL1")
def reduce(node, types, values):
    x = types[0]
    keep = bool(node.attrs.get("keepdims", 1))
    return [_t(x.dtype, _reduced(node, x, _axes(node, values, 1), keep))]


@rule("ArgMax", "ArgMin")
def arg(node, types, values):
    keep = bool(node.attrs.get("keepdims", 1))
    return [_t(DType.i64, _reduced(node, types[0], (node.attrs.get("axis", 0),), keep))]


@rule("OneHot")
def one_hot(node, types, values):
    idx, values_type = types[0], types[2]
    depth = _ints(values[1])[0] if values[1] is not None else unknown_dim()
    if idx.shape is None:
        return [_t(values_type.dtype, None)]
    axis = _pos(node, node.attrs.get("axis", -1), len(idx.shape) + 1)
    return [_t(values_type.dtype, (*idx.shape[:axis], depth, *idx.shape[axis:]))]


@rule("TopK")
def top_k(node, types, values):
    x = types[0]
    k = _ints(values[1])[0] if _get(node.inputs, 1) and values[1] is not None else \
        node.attrs.get("k", unknown_dim())
    if x.shape is None:
        return [x, _t(DType.i64, None)]
    axis = _pos(node, node.attrs.get("axis", -1), len(x.shape))
    out = (*x.shape[:axis], k, *x.shape[axis + 1:])
    return [_t(x.dtype, out), _t(DType.i64, out)]


def _stats(node: Node, x: TensorType) -> TensorType:
    """Mean / inverse std outputs: float32 (stash_type 1), normalized axes kept as 1."""
    if x.shape is None:
        return _t(DType.f32, None)
    axis = _pos(node, node.attrs.get("axis", -1), len(x.shape))
    return _t(DType.f32, (*x.shape[:axis], *([1] * (len(x.shape) - axis))))


def _check_scale(node: Node, x: TensorType, scale: TensorType | None) -> None:
    if x.shape and scale is not None and scale.shape and \
            same_dim(x.shape[-1], scale.shape[-1]) is False:
        raise fail(node, "scale does not match the normalized dims", x, scale)


@rule("LayerNormalization")
def layer_normalization(node, types, values):
    x = types[0]
    _check_scale(node, x, types[1])
    return [x, _stats(node, x), _stats(node, x)]


@rule("SimplifiedLayerNormalization")
def simplified_layer_normalization(node, types, values):
    x = types[0]
    _check_scale(node, x, types[1])
    return [x, _stats(node, x)]


@rule("com.microsoft.SkipLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization")
def skip_layer_normalization(node, types, values):
    x = types[0]
    _check_scale(node, x, types[2])
    return [x, _stats(node, x), _stats(node, x), x]


# ---------------------------------------------------------------------------------------------
# attention (opset 23)


@rule("Attention")
def attention(node, types, values):
    q, k, v = types[:3]
    past_k = _get(types, 4)
    if q.shape is None or k.shape is None or v.shape is None:
        return [_t(q.dtype, None), _t(k.dtype, None), _t(v.dtype, None), _t(q.dtype, None)]
    if len(q.shape) == 3:
        kvh = node.attrs.get("kv_num_heads")
        qh = node.attrs.get("q_num_heads")
        b, s = q.shape[:2]
        d_v = sympy.sympify(v.shape[2]) / kvh
        d_k = sympy.sympify(k.shape[2]) / kvh
        kv_len = k.shape[1]
        out = (b, s, _dim(d_v * qh))
    else:
        b, qh, s = q.shape[:3]
        kvh, kv_len, d_k, d_v = k.shape[1], k.shape[2], k.shape[3], v.shape[3]
        out = (b, qh, s, d_v)
        if same_dim(q.shape[3], d_k) is False:
            raise fail(node, "query and key head sizes differ", q, k)
    total = kv_len
    if past_k is not None and past_k.shape is not None:
        total = _dim(sympy.sympify(past_k.shape[2]) + kv_len)
    present_k = _t(k.dtype, (b, kvh, total, _dim(d_k)))
    present_v = _t(v.dtype, (b, kvh, total, _dim(d_v)))
    return [_t(q.dtype, out), present_k, present_v, _t(q.dtype, (b, qh, s, total))]


def _dim(d) -> Dim:
    d = sympy.sympify(d)
    return int(d) if d.is_Integer else d
