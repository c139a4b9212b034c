"""Numpy kernels for the ONNX-level (generic) ops, following the ONNX operator specification.

Every optional attribute takes its ONNX default when absent; negative axes count from the end.
Ops whose axes/sizes moved from attributes to inputs across opsets (Squeeze, Unsqueeze, ReduceX,
Split, Slice, Pad, TopK, Clip) accept both forms: an input, when present, wins over the attribute.

Shape arithmetic: the integer ops that exports use on Shape outputs (Gather, Concat, Unsqueeze,
Squeeze, Slice, Add, Sub, Mul, Div, Cast, Equal, Where, Min, Max, ReduceProd, Expand, Reshape, ...)
also accept numpy object arrays whose elements are ints or sympy dims; results are object arrays
again (int64 when every element became an int). A comparison that depends on symbol values raises
ValueError, which the folding passes read as "not known". Integer Div truncates toward zero like
onnxruntime (floor division on symbolic dims, which are non-negative).

Folded forms: when fold_constants turns a constant shape input into an attribute, the node keeps
its op and drops the input; the attribute (possibly holding sympy dims, concretized by the
interpreter before the kernel runs) means:
    Reshape(x)          shape=(d, ...)      the literal output shape (no 0 or -1 left)
    Expand(x)           shape=(d, ...)      the output shape (already broadcast with x's shape)
    ConstantOfShape()   shape=(d, ...), value=scalar, dtype=DType
    Range()             start, limit, delta (scalars or dims), dtype=DType
    Slice(x)            starts, ends, axes, steps (tuples of equal length)
    Tile(x)             repeats=(n, ...)
    Squeeze/Unsqueeze(x), ReduceX(x)        axes=(a, ...)   (the pre-opset-13/18 attribute form)
    Split(x)            split=(n, ...)      (the pre-opset-13 attribute form)
    Pad(x)              pads=(begin..., end...) over every axis, value=scalar
    TopK(x)             k=n
    CumSum(x)           axis=n
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import sympy

from kiln.compiler.interpreter import kernel
from kiln.compiler.ir import Attrs, DType

try:  # scipy's erf is exact to float64 rounding; the fallback is exact but slower
    from scipy.special import erf as _scipy_erf
except ImportError:  # pragma: no cover - scipy is present wherever kiln is developed
    _scipy_erf = None

Arrays = Sequence[np.ndarray | None]

# ---------------------------------------------------------------------------------------------
# helpers


def _opt(inputs: Arrays, i: int) -> np.ndarray | None:
    return inputs[i] if i < len(inputs) else None


def _ints(a) -> tuple:
    """A 0-d or 1-d integer tensor (possibly an object array of dims) as a tuple of ints/dims."""
    return tuple(int(v) if isinstance(v, int | np.integer) else v for v in np.ravel(a))


def _axes(inputs: Arrays, i: int, attrs: Attrs) -> tuple | None:
    """Axes from input i (opset 13/18 form) or from the `axes` attribute; None when absent."""
    a = _opt(inputs, i)
    if a is not None:
        return _ints(a)
    return attrs.get("axes")


def _pos(axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"axis {axis} out of range for rank {rank}")
    return axis + rank if axis < 0 else axis


def is_symbolic(a: np.ndarray | None) -> bool:
    return a is not None and a.dtype == object


def normalize(a) -> np.ndarray:
    """An object array of dims with sympy integers made ints; int64 when no symbol is left."""
    if not isinstance(a, np.ndarray):  # a lone dim that numpy returned unwrapped
        a = np.array(a, dtype=object)
    if a.dtype != object:
        return a
    flat = [int(v) if isinstance(v, int | np.integer | sympy.Integer) else v for v in a.ravel()]
    if all(isinstance(v, int) for v in flat):
        return np.array(flat, dtype=np.int64).reshape(a.shape)
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(a.shape)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype.itemsize < 4 else x


def _decide(r) -> bool:
    """The truth of a comparison between dims; ValueError when it depends on symbol values."""
    if isinstance(r, bool | np.bool_):
        return bool(r)
    if r in (sympy.true, sympy.false):
        return bool(r)
    raise ValueError(f"comparison {r} depends on symbol values")


# ---------------------------------------------------------------------------------------------
# elementwise


def erf(x: np.ndarray) -> np.ndarray:
    """Elementwise erf in x's dtype (computed in float32 or float64)."""
    wide = _f32(np.asarray(x))
    if _scipy_erf is not None:
        y = _scipy_erf(wide)
    else:
        y = np.frompyfunc(math.erf, 1, 1)(wide).astype(wide.dtype)
    return y.astype(x.dtype, copy=False)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Neg": np.negative, "Abs": np.abs, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal,
    "Exp": np.exp, "Log": np.log, "Tanh": np.tanh, "Sigmoid": _sigmoid, "Erf": erf,
    "Relu": lambda x: np.maximum(x, 0).astype(x.dtype), "Cos": np.cos, "Sin": np.sin,
    "Floor": np.floor, "Ceil": np.ceil, "Sign": np.sign, "Not": np.logical_not,
    "IsNaN": np.isnan, "Round": np.round, "Softplus": _softplus, "Tan": np.tan,
    "Mish": lambda x: x * np.tanh(_softplus(x)),
}


def _unary(op: str) -> None:
    fn = _UNARY[op]

    def run(inputs, attrs):
        (x,) = inputs
        if is_symbolic(x) and op in ("Neg", "Abs"):
            return [normalize(fn(x))]
        with np.errstate(all="ignore"):
            y = fn(_f32(x) if x.dtype.kind == "f" else x)
        return [y if y.dtype == np.bool_ else y.astype(x.dtype, copy=False)]

    kernel(op)(run)


for _op in _UNARY:
    _unary(_op)


@kernel("IsInf")
def is_inf(inputs, attrs):
    (x,) = inputs
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    return [(np.isposinf(x) & bool(pos)) | (np.isneginf(x) & bool(neg))]


def _trunc_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if is_symbolic(a) or is_symbolic(b):
        return np.floor_divide(a, b)  # dims are non-negative: floor == truncation
    if a.dtype.kind in "iu":
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q).astype(a.dtype)
    return np.divide(a, b)


def _sym_pair(fn: Callable, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.frompyfunc(fn, 2, 1)(np.asarray(a, dtype=object), np.asarray(b, dtype=object))


_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": _trunc_div,
    "Pow": np.power, "And": np.logical_and, "Or": np.logical_or, "Xor": np.logical_xor,
    "BitwiseAnd": np.bitwise_and, "BitwiseOr": np.bitwise_or,
}


def _binary(op: str) -> None:
    fn = _BINARY[op]

    def run(inputs, attrs):
        a, b = inputs
        with np.errstate(all="ignore"):
            y = fn(a, b)
        if is_symbolic(a) or is_symbolic(b):  # 0-d object results come back unwrapped
            return [normalize(y)]
        return [y.astype(a.dtype, copy=False)]

    kernel(op)(run)


for _op in _BINARY:
    _binary(_op)


@kernel("Mod")
def mod(inputs, attrs):
    a, b = inputs
    with np.errstate(all="ignore"):
        y = np.fmod(a, b) if attrs.get("fmod", 0) else np.mod(a, b)
    if is_symbolic(a) or is_symbolic(b):
        return [normalize(y)]
    return [y.astype(a.dtype, copy=False)]


_COMPARE: dict[str, Callable] = {
    "Less": lambda x, y: x < y, "LessOrEqual": lambda x, y: x <= y,
    "Greater": lambda x, y: x > y, "GreaterOrEqual": lambda x, y: x >= y,
}


def _compare(op: str) -> None:
    cmp = _COMPARE[op]

    def run(inputs, attrs):
        a, b = inputs
        if is_symbolic(a) or is_symbolic(b):
            return [_sym_pair(lambda x, y: _decide(cmp(x, y)), a, b).astype(bool)]
        return [cmp(a, b)]

    kernel(op)(run)


for _op in _COMPARE:
    _compare(_op)


def _dims_equal(x, y) -> bool:
    if x == y:
        return True
    diff = sympy.sympify(x) - sympy.sympify(y)
    if diff.is_number:
        return diff == 0
    if diff.is_zero is False:
        return False
    raise ValueError(f"whether {x} == {y} depends on symbol values")


@kernel("Equal")
def equal(inputs, attrs):
    a, b = inputs
    if is_symbolic(a) or is_symbolic(b):
        return [_sym_pair(_dims_equal, a, b).astype(bool)]
    return [np.equal(a, b)]


def _variadic(np_fn: Callable, sym_fn: Callable | None) -> Callable:
    def run(inputs, attrs):
        arrays = [x for x in inputs if x is not None]
        acc = arrays[0]
        for x in arrays[1:]:
            if sym_fn is not None and (is_symbolic(acc) or is_symbolic(x)):
                acc = normalize(_sym_pair(sym_fn, acc, x))
            else:
                acc = np_fn(acc, x)
        return [acc if is_symbolic(acc) else acc.astype(arrays[0].dtype, copy=False)]

    return run


kernel("Min")(_variadic(np.minimum, sympy.Min))
kernel("Max")(_variadic(np.maximum, sympy.Max))
kernel("Sum")(_variadic(np.add, lambda x, y: x + y))


@kernel("Mean")
def mean(inputs, attrs):
    arrays = [x for x in inputs if x is not None]
    return [(sum(arrays[1:], arrays[0]) / len(arrays)).astype(arrays[0].dtype)]


@kernel("Where")
def where(inputs, attrs):
    cond, a, b = inputs
    y = np.where(cond.astype(bool), a, b)
    return [normalize(y) if is_symbolic(y) else y.astype(a.dtype, copy=False)]


@kernel("Clip")
def clip(inputs, attrs):
    x = inputs[0]
    lo, hi = _opt(inputs, 1), _opt(inputs, 2)
    lo = lo if lo is not None else attrs.get("min")
    hi = hi if hi is not None else attrs.get("max")
    y = x
    if lo is not None:
        y = np.maximum(y, np.asarray(lo, x.dtype))
    if hi is not None:
        y = np.minimum(y, np.asarray(hi, x.dtype))
    return [y.astype(x.dtype, copy=False)]


@kernel("LeakyRelu")
def leaky_relu(inputs, attrs):
    (x,) = inputs
    return [np.where(x >= 0, x, x * np.asarray(attrs.get("alpha", 0.01), x.dtype))]


@kernel("Elu")
def elu(inputs, attrs):
    (x,) = inputs
    alpha = np.asarray(attrs.get("alpha", 1.0), x.dtype)
    with np.errstate(over="ignore"):
        return [np.where(x >= 0, x, alpha * np.expm1(x)).astype(x.dtype)]


@kernel("HardSigmoid")
def hard_sigmoid(inputs, attrs):
    (x,) = inputs
    a, b = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return [np.clip(np.asarray(a, x.dtype) * x + np.asarray(b, x.dtype), 0, 1).astype(x.dtype)]


@kernel("HardSwish")
def hard_swish(inputs, attrs):
    (x,) = inputs
    return [(x * np.clip(x / np.asarray(6, x.dtype) + np.asarray(0.5, x.dtype), 0, 1))
            .astype(x.dtype)]


def _gelu(x: np.ndarray, approximate: str) -> np.ndarray:
    x32 = _f32(x)
    if approximate == "tanh":
        c = np.asarray(math.sqrt(2.0 / math.pi), x32.dtype)
        y = 0.5 * x32 * (1.0 + np.tanh(c * (x32 + np.asarray(0.044715, x32.dtype) * x32 ** 3)))
    else:
        y = 0.5 * x32 * (1.0 + erf(x32 / np.asarray(math.sqrt(2.0), x32.dtype)))
    return y.astype(x.dtype)


@kernel("Gelu")
def gelu(inputs, attrs):
    return [_gelu(inputs[0], attrs.get("approximate", "none"))]


# ---------------------------------------------------------------------------------------------
# matrix products


@kernel("MatMul")
def matmul(inputs, attrs):
    a, b = inputs
    return [np.matmul(a, b).astype(a.dtype, copy=False)]


@kernel("Gemm")
def gemm(inputs, attrs):
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = np.asarray(attrs.get("alpha", 1.0), a.dtype) * (a @ b)
    if c is not None:
        y = y + np.asarray(attrs.get("beta", 1.0), a.dtype) * c
    return [y.astype(a.dtype, copy=False)]


@kernel("Einsum")
def einsum(inputs, attrs):
    eq = attrs["equation"].replace(" ", "")
    dt = inputs[0].dtype
    if dt.kind == "V" or dt == np.float16:  # bfloat16 (a numpy "void" kind) and fp16: in fp32
        inputs = [_f32(x) for x in inputs]
    return [np.einsum(eq, *inputs).astype(dt, copy=False)]


# ---------------------------------------------------------------------------------------------
# casts


def _cast(x: np.ndarray, to: DType) -> np.ndarray:
    if is_symbolic(x):
        x = normalize(x)
        if is_symbolic(x):
            if not to.is_int:
                raise ValueError(f"cannot cast symbolic dims to {to.value}")
            return x
    if to is DType.bool:
        return x != 0
    if x.dtype.kind == "f" and to.is_int:  # ONNX truncates toward zero
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(to.numpy)
    return x.astype(to.numpy)


@kernel("Cast")
def cast(inputs, attrs):
    return [_cast(inputs[0], attrs["to"])]


@kernel("CastLike")
def cast_like(inputs, attrs):
    x, like = inputs
    return [_cast(x, DType.of(like.dtype))]


# ---------------------------------------------------------------------------------------------
# shapes and layout


@kernel("Shape")
def shape(inputs, attrs):
    dims = inputs[0].shape
    rank = len(dims)
    start = max(0, min(rank, _wrap(attrs.get("start", 0), rank)))
    end = attrs.get("end")
    end = rank if end is None else max(0, min(rank, _wrap(end, rank)))
    return [np.array(dims[start:end], dtype=np.int64)]


def _wrap(i: int, n: int) -> int:
    return i + n if i < 0 else i


@kernel("Size")
def size(inputs, attrs):
    return [np.array(inputs[0].size, dtype=np.int64)]


def reshape_target(in_shape: Sequence, target: Sequence, allowzero: bool) -> tuple:
    """ONNX Reshape's output shape: 0 copies the input dim (unless allowzero), -1 is inferred.

    Works on ints and sympy dims; exported so shape rules and folding share it.
    """
    out = [in_shape[i] if (d == 0 and not allowzero) else d for i, d in enumerate(target)]
    if -1 in out:
        k = out.index(-1)
        known = math.prod(d for i, d in enumerate(out) if i != k)
        total = math.prod(in_shape)
        rest = sympy.simplify(sympy.sympify(total) / known) if not isinstance(
            total, int) or not isinstance(known, int) else total // known
        out[k] = int(rest) if isinstance(rest, int | sympy.Integer) else rest
    return tuple(out)


@kernel("Reshape")
def reshape(inputs, attrs):
    x, target = inputs[0], _opt(inputs, 1)
    if target is None:  # folded form: the literal output shape
        return [x.reshape(attrs["shape"])]
    return [x.reshape(reshape_target(x.shape, _ints(target), bool(attrs.get("allowzero", 0))))]


@kernel("Flatten")
def flatten(inputs, attrs):
    (x,) = inputs
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@kernel("Squeeze")
def squeeze(inputs, attrs):
    x = inputs[0]
    axes = _axes(inputs, 1, attrs)
    if axes is None:
        axes = tuple(i for i, d in enumerate(x.shape) if d == 1)
    return [np.squeeze(x, axis=tuple(_pos(a, x.ndim) for a in axes))]


@kernel("Unsqueeze")
def unsqueeze(inputs, attrs):
    x = inputs[0]
    axes = _axes(inputs, 1, attrs)
    rank = x.ndim + len(axes)
    return [np.expand_dims(x, axis=tuple(sorted(_pos(a, rank) for a in axes)))]


@kernel("Transpose")
def transpose(inputs, attrs):
    (x,) = inputs
    perm = attrs.get("perm")
    return [np.transpose(x, perm if perm is None else tuple(perm))]


@kernel("Expand")
def expand(inputs, attrs):
    x, target = inputs[0], _opt(inputs, 1)
    dims = attrs["shape"] if target is None else _ints(target)
    out = np.broadcast_shapes(x.shape, tuple(dims))
    return [np.array(np.broadcast_to(x, out))]


@kernel("Concat")
def concat(inputs, attrs):
    arrays = [x for x in inputs if x is not None]
    y = np.concatenate(arrays, axis=_pos(attrs["axis"], arrays[0].ndim))
    return [normalize(y) if is_symbolic(y) else y]


def split_sizes(length, inputs: Arrays, attrs: Attrs, count: int | None) -> tuple:
    """Split's chunk sizes from the `split` input or attribute, or `num_outputs` (opset 18)."""
    given = _opt(inputs, 1)
    if given is not None:
        return _ints(given)
    if attrs.get("split") is not None:
        return tuple(attrs["split"])
    n = attrs.get("num_outputs", count)
    if n is None:
        raise ValueError("Split needs a `split` input/attribute or `num_outputs`")
    chunk = -(-length // n)
    return tuple([chunk] * (n - 1) + [length - chunk * (n - 1)])


@kernel("Split")
def split(inputs, attrs):
    x = inputs[0]
    axis = _pos(attrs.get("axis", 0), x.ndim)
    sizes = split_sizes(x.shape[axis], inputs, attrs, None)
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


def slice_params(inputs: Arrays, attrs: Attrs, rank: int) -> list[tuple[int, int, int, int]]:
    """(axis, start, end, step) per sliced axis from the Slice inputs (opset 10) or attributes."""
    if len(inputs) > 1 and inputs[1] is not None:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _opt(inputs, 3) is not None else None
        steps = _ints(inputs[4]) if _opt(inputs, 4) is not None else None
    else:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), attrs.get("steps")
    axes = axes if axes is not None else tuple(range(len(starts)))
    steps = steps if steps is not None else (1,) * len(starts)
    return [(_pos(a, rank), s, e, t) for a, s, e, t in zip(axes, starts, ends, steps, strict=True)]


def slice_bounds(start: int, end: int, step: int, n: int) -> slice:
    """The python slice of an ONNX Slice over one axis of length n (ONNX clamping rules)."""
    if step == 0:
        raise ValueError("Slice step cannot be 0")
    start, end = start + n if start < 0 else start, end + n if end < 0 else end
    if step > 0:
        return slice(min(max(start, 0), n), min(max(end, 0), n), step)
    start, end = min(max(start, -1), n - 1), min(max(end, -1), n - 1)
    if start < 0:
        return slice(0, 0)
    return slice(start, None if end < 0 else end, step)


@kernel("Slice")
def slice_(inputs, attrs):
    x = inputs[0]
    index = [slice(None)] * x.ndim
    for axis, start, end, step in slice_params(inputs, attrs, x.ndim):
        index[axis] = slice_bounds(int(start), int(end), int(step), x.shape[axis])
    return [x[tuple(index)]]


@kernel("Gather")
def gather(inputs, attrs):
    x, idx = inputs
    y = np.take(x, idx.astype(np.int64), axis=_pos(attrs.get("axis", 0), x.ndim))
    return [normalize(y) if is_symbolic(x) else y]


def _wrap_indices(idx: np.ndarray, n) -> np.ndarray:
    idx = idx.astype(np.int64)
    return np.where(idx < 0, idx + n, idx)


@kernel("GatherElements")
def gather_elements(inputs, attrs):
    x, idx = inputs
    axis = _pos(attrs.get("axis", 0), x.ndim)
    return [np.take_along_axis(x, _wrap_indices(idx, x.shape[axis]), axis=axis)]


@kernel("GatherND")
def gather_nd(inputs, attrs):
    x, idx = inputs
    b = attrs.get("batch_dims", 0)
    idx = idx.astype(np.int64)
    batch = x.shape[:b]
    k = idx.shape[-1]
    flat_x = x.reshape(math.prod(batch), *x.shape[b:])
    flat_i = idx.reshape(math.prod(batch), -1, k)
    out = [fx[tuple(_wrap_indices(fi, np.array(fx.shape[:k])).T)]
           for fx, fi in zip(flat_x, flat_i, strict=True)]
    return [np.stack(out).reshape(*idx.shape[:-1], *x.shape[b + k:])]


_REDUCE_AT = {"add": np.add.at, "mul": np.multiply.at, "max": np.maximum.at,
              "min": np.minimum.at}


@kernel("ScatterND")
def scatter_nd(inputs, attrs):
    x, idx, upd = inputs
    y = x.copy()
    idx = _wrap_indices(idx, np.array(x.shape[:idx.shape[-1]]))
    where = tuple(np.moveaxis(idx, -1, 0))
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        y[where] = upd
    else:
        _REDUCE_AT[reduction](y, where, upd)
    return [y]


@kernel("ScatterElements")
def scatter_elements(inputs, attrs):
    x, idx, upd = inputs
    axis = _pos(attrs.get("axis", 0), x.ndim)
    idx = _wrap_indices(idx, x.shape[axis])
    where = list(np.indices(idx.shape, sparse=True))
    where[axis] = idx
    y = x.copy()
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        y[tuple(where)] = upd
    else:
        _REDUCE_AT[reduction](y, tuple(where), upd)
    return [y]


@kernel("Tile")
def tile(inputs, attrs):
    x, reps = inputs[0], _opt(inputs, 1)
    return [np.tile(x, attrs["repeats"] if reps is None else _ints(reps))]


def pad_widths(inputs: Arrays, attrs: Attrs, rank: int) -> list[list[int]]:
    """[[begin, end], ...] per axis from Pad's pads (and opset-18 axes) input or attribute."""
    pads = _ints(inputs[1]) if _opt(inputs, 1) is not None else attrs["pads"]
    axes = _axes(inputs, 3, Attrs()) or tuple(range(rank))
    widths = [[0, 0] for _ in range(rank)]
    for i, a in enumerate(axes):
        widths[_pos(a, rank)] = [pads[i], pads[i + len(axes)]]
    return widths


@kernel("Pad")
def pad(inputs, attrs):
    x = inputs[0]
    widths = pad_widths(inputs, attrs, x.ndim)
    value = _opt(inputs, 2)
    value = value.item() if value is not None and value.size else attrs.get("value", 0)
    grow = [[max(b, 0), max(e, 0)] for b, e in widths]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}[
        attrs.get("mode", "constant")]
    kw = {"constant_values": value} if mode == "constant" else {}
    y = np.pad(x, grow, mode=mode, **kw)
    crop = tuple(slice(-min(b, 0), y.shape[i] + min(e, 0)) for i, (b, e) in enumerate(widths))
    return [y[crop].astype(x.dtype, copy=False)]


@kernel("ConstantOfShape")
def constant_of_shape(inputs, attrs):
    dims = attrs["shape"] if _opt(inputs, 0) is None else _ints(inputs[0])
    dtype = attrs.get("dtype", DType.f32)
    return [np.full(tuple(dims), attrs.get("value", 0), dtype=dtype.numpy)]


@kernel("Range")
def range_(inputs, attrs):
    if _opt(inputs, 0) is not None:
        start, limit, delta = (x.item() for x in inputs[:3])
        dtype = inputs[0].dtype
    else:
        start, limit, delta = attrs["start"], attrs["limit"], attrs["delta"]
        dtype = attrs["dtype"].numpy
    n = max(math.ceil((limit - start) / delta), 0)
    return [(np.asarray(start, dtype) + np.arange(n, dtype=dtype) * np.asarray(delta, dtype))
            .astype(dtype)]


@kernel("Trilu")
def trilu(inputs, attrs):
    x, k = inputs[0], _opt(inputs, 1)
    k = 0 if k is None else int(k.item())
    return [np.triu(x, k) if attrs.get("upper", 1) else np.tril(x, k)]


@kernel("Identity")
def identity(inputs, attrs):
    return [inputs[0]]


@kernel("Dropout")
def dropout(inputs, attrs):
    x = inputs[0]
    return [x, np.ones(x.shape, dtype=bool)]


@kernel("EyeLike")
def eye_like(inputs, attrs):
    (x,) = inputs
    dtype = attrs["dtype"].numpy if attrs.get("dtype") is not None else x.dtype
    return [np.eye(x.shape[0], x.shape[1], k=attrs.get("k", 0), dtype=dtype)]


@kernel("NonZero")
def non_zero(inputs, attrs):
    return [np.array(np.nonzero(inputs[0]), dtype=np.int64).reshape(inputs[0].ndim, -1)]


# ---------------------------------------------------------------------------------------------
# reductions and normalizations


def _reduce(fn: Callable, *, square: bool = False, post: Callable | None = None) -> Callable:
    def run(inputs, attrs):
        x = inputs[0]
        axes = _axes(inputs, 1, attrs)
        keep = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [x]
            axes = tuple(range(x.ndim))
        axes = tuple(_pos(a, x.ndim) for a in axes)
        v = x * x if square else x
        empty = {"initial": _identity(fn, x.dtype)} if v.size == 0 and fn in _EXTREMA else {}
        y = fn(v, axis=axes, keepdims=keep, **empty)
        y = post(y) if post is not None else y
        return [normalize(y) if is_symbolic(x) else np.asarray(y).astype(x.dtype, copy=False)]

    return run


_EXTREMA = (np.max, np.min)


def _identity(fn: Callable, dt: np.dtype) -> object:
    """The value ReduceMax (np.max) / ReduceMin (np.min) give over an empty set."""
    low = fn is np.max
    if dt == np.bool_:
        return not low
    if dt.kind in "iu":
        info = np.iinfo(dt)
        return info.min if low else info.max
    return -np.inf if low else np.inf


kernel("ReduceSum")(_reduce(np.sum))
kernel("ReduceMean")(_reduce(np.mean))
kernel("ReduceMax")(_reduce(np.max))
kernel("ReduceMin")(_reduce(np.min))
kernel("ReduceProd")(_reduce(np.prod))
kernel("ReduceSumSquare")(_reduce(np.sum, square=True))
kernel("ReduceL2")(_reduce(np.sum, square=True, post=np.sqrt))
kernel("ReduceL1")(_reduce(lambda v, **kw: np.sum(np.abs(v), **kw)))


def _arg(fn: Callable) -> Callable:
    def run(inputs, attrs):
        (x,) = inputs
        axis = _pos(attrs.get("axis", 0), x.ndim)
        if attrs.get("select_last_index", 0):
            y = x.shape[axis] - 1 - fn(np.flip(x, axis), axis=axis)
        else:
            y = fn(x, axis=axis)
        y = np.asarray(y, dtype=np.int64)
        return [np.expand_dims(y, axis) if attrs.get("keepdims", 1) else y]

    return run


kernel("ArgMax")(_arg(np.argmax))
kernel("ArgMin")(_arg(np.argmin))


def _softmax32(x: np.ndarray, axis: int) -> np.ndarray:
    x32 = _f32(x)
    z = x32 - np.max(x32, axis=axis, keepdims=True)
    with np.errstate(invalid="ignore"):
        e = np.exp(z)
        return e / np.sum(e, axis=axis, keepdims=True)


def _softmax_at(x: np.ndarray, dt: np.dtype, axis: int) -> np.ndarray:
    """Softmax computed in dtype dt (exp, sum and divide each rounded to it), as Attention's
    softmax_precision asks; fp32 and wider go through _softmax32."""
    if dt.itemsize >= 4:
        return _softmax32(x.astype(dt, copy=False), axis)
    x = x.astype(dt)
    with np.errstate(invalid="ignore", over="ignore"):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True)).astype(dt)
        return (e / np.sum(e, axis=axis, keepdims=True).astype(dt)).astype(dt)


@kernel("Softmax")
def softmax(inputs, attrs):
    (x,) = inputs  # in the input's own precision, like ONNX's reference
    return [_softmax_at(x, x.dtype, attrs.get("axis", -1)).astype(x.dtype)]


@kernel("LogSoftmax")
def log_softmax(inputs, attrs):
    (x,) = inputs
    x32 = _f32(x)
    axis = attrs.get("axis", -1)
    z = x32 - np.max(x32, axis=axis, keepdims=True)
    return [(z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))).astype(x.dtype)]


def _norm_axes(x: np.ndarray, attrs: Attrs) -> tuple[int, ...]:
    return tuple(range(_pos(attrs.get("axis", -1), x.ndim), x.ndim))


def _stash(x: np.ndarray, attrs: Attrs) -> np.ndarray:
    """The input in the normalization's compute precision (stash_type 1: float32)."""
    return x.astype(np.float32) if attrs.get("stash_type", 1) == 1 else x


@kernel("LayerNormalization")
def layer_normalization(inputs, attrs):
    x, scale, bias = inputs[0], inputs[1], _opt(inputs, 2)
    axes = _norm_axes(x, attrs)
    xs = _stash(x, attrs)
    mu = xs.mean(axis=axes, keepdims=True)
    inv = 1 / np.sqrt(((xs - mu) ** 2).mean(axis=axes, keepdims=True)
                      + np.asarray(attrs.get("epsilon", 1e-5), xs.dtype))
    y = (xs - mu) * inv * scale.astype(xs.dtype)
    if bias is not None:
        y = y + bias.astype(xs.dtype)
    return [y.astype(x.dtype), mu, inv]


def _rms(x: np.ndarray, scale: np.ndarray, attrs: Attrs) -> tuple[np.ndarray, np.ndarray]:
    axes = _norm_axes(x, attrs)
    xs = _stash(x, attrs)
    inv = 1 / np.sqrt((xs * xs).mean(axis=axes, keepdims=True)
                      + np.asarray(attrs.get("epsilon", 1e-5), xs.dtype))
    return (xs * inv * scale.astype(xs.dtype)).astype(x.dtype), inv


@kernel("RMSNormalization", "SimplifiedLayerNormalization")
def rms_normalization(inputs, attrs):
    y, inv = _rms(inputs[0], inputs[1], attrs)
    return [y, inv]


@kernel("CumSum")
def cum_sum(inputs, attrs):
    x, axis = inputs[0], _opt(inputs, 1)
    axis = _pos(int(axis.item()) if axis is not None else attrs["axis"], x.ndim)
    v = np.flip(x, axis) if attrs.get("reverse", 0) else x
    y = np.cumsum(v, axis=axis, dtype=x.dtype)
    if attrs.get("exclusive", 0):
        y = np.concatenate([np.zeros_like(np.take(y, [0], axis=axis)),
                            np.take(y, np.arange(y.shape[axis] - 1), axis=axis)], axis=axis)
    return [np.flip(y, axis) if attrs.get("reverse", 0) else y]


@kernel("OneHot")
def one_hot(inputs, attrs):
    idx, depth, values = inputs
    n = int(np.asarray(depth).reshape(-1)[0])
    axis = _pos(attrs.get("axis", -1), idx.ndim + 1)
    i = np.asarray(idx).astype(np.int64)
    i = np.where(i < 0, i + n, i)  # [-depth, -1] counts from the end; others stay off
    hot = np.expand_dims(i, axis) == np.arange(n).reshape([-1] + [1] * (idx.ndim - axis))
    return [np.where(hot, values[1], values[0]).astype(values.dtype)]


@kernel("TopK")
def top_k(inputs, attrs):
    x, k = inputs[0], _opt(inputs, 1)
    k = int(k.item()) if k is not None else attrs["k"]
    axis = _pos(attrs.get("axis", -1), x.ndim)
    key = -x if attrs.get("largest", 1) else x
    order = np.argsort(key, axis=axis, kind="stable")
    idx = np.take(order, np.arange(k), axis=axis)
    return [np.take_along_axis(x, idx, axis=axis), idx.astype(np.int64)]


# ---------------------------------------------------------------------------------------------
# attention (opset 23)


def _heads(x: np.ndarray, n: int | None) -> np.ndarray:
    """[b, s, n*D] -> [b, n, s, D]; 4-d inputs are already in that layout."""
    if x.ndim == 4:
        return x
    b, s, hidden = x.shape
    return x.reshape(b, s, n, hidden // n).transpose(0, 2, 1, 3)


def _attention_bias(mask: np.ndarray | None, causal: bool, q_len: int, total: int, past: int,
                    dtype: np.dtype) -> np.ndarray:
    """The additive bias [.., q_len, total]: bool masks select (True: attend), floats add."""
    bias = np.zeros((q_len, total), dtype)
    if mask is not None:
        if mask.shape[-1] < total:  # short masks are padded with "masked"
            fill = False if mask.dtype == np.bool_ else -np.inf
            widths = [(0, 0)] * (mask.ndim - 1) + [(0, total - mask.shape[-1])]
            mask = np.pad(mask, widths, constant_values=fill)
        bias = bias + (np.where(mask, 0, -np.inf).astype(dtype) if mask.dtype == np.bool_
                       else mask.astype(dtype))
    if causal:  # aligned after the past: query i sees keys j <= i + past
        allowed = np.arange(total)[None, :] <= np.arange(q_len)[:, None] + past
        bias = bias + np.where(allowed, 0, -np.inf).astype(dtype)
    return bias


def _scores(q: np.ndarray, k: np.ndarray, scale: float) -> np.ndarray:
    """Q K^T * scale as the spec's function body computes it: Q and K each scaled by
    sqrt(scale) in their own type, the product accumulated in fp32 and rounded to that type."""
    root = np.asarray(math.sqrt(scale), q.dtype)
    return np.matmul(_f32(q * root), _f32(k * root).transpose(0, 1, 3, 2)).astype(q.dtype)


@kernel("Attention")
def attention(inputs, attrs):
    q, k, v = inputs[:3]
    mask, past_k, past_v = _opt(inputs, 3), _opt(inputs, 4), _opt(inputs, 5)
    qh = _heads(q, attrs.get("q_num_heads"))
    kh = _heads(k, attrs.get("kv_num_heads"))
    vh = _heads(v, attrs.get("kv_num_heads"))
    if past_k is not None:
        kh, vh = np.concatenate([past_k, kh], axis=2), np.concatenate([past_v, vh], axis=2)
    present_k, present_v = kh, vh
    group = qh.shape[1] // kh.shape[1]
    kf, vf = np.repeat(kh, group, axis=1), np.repeat(_f32(vh), group, axis=1)
    scale = attrs.get("scale") or 1 / math.sqrt(qh.shape[-1])
    scores = _scores(qh, kf, scale)
    stages = [scores]  # qk_matmul_output_mode 0: raw scaled scores, 1: softcapped,
    softcap = attrs.get("softcap", 0.0)  # 2: with the mask bias, 3: softmax probabilities
    if softcap and softcap > 0:
        scores = np.tanh(scores / np.float32(softcap)) * np.float32(softcap)
    past = 0 if past_k is None else past_k.shape[2]
    bias = _attention_bias(mask, bool(attrs.get("is_causal", 0)), qh.shape[2], kh.shape[2],
                           past, scores.dtype)
    precision = attrs.get("softmax_precision")  # default: the inputs' own precision
    p = _softmax_at(scores + bias, precision.numpy if precision else q.dtype, -1)
    p = np.where(np.isneginf(np.max(bias, axis=-1, keepdims=True)), 0, p)
    stages += [scores, scores + bias, p]
    out = np.matmul(p.astype(q.dtype).astype(np.float32), vf).astype(q.dtype)
    if q.ndim == 3:
        out = out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[1], -1)
    qk = stages[attrs.get("qk_matmul_output_mode", 0)]
    return [out, present_k, present_v, qk.astype(q.dtype)]


@kernel("RotaryEmbedding")
def rotary_embedding(inputs, attrs):
    x, cos, sin, pos = inputs[0], inputs[1], inputs[2], _opt(inputs, 3)
    xs = x.transpose(0, 2, 1, 3) if x.ndim == 4 else x.reshape(
        x.shape[0], x.shape[1], attrs["num_heads"], -1)  # [b, s, heads, D]
    r = attrs.get("rotary_embedding_dim", 0) or xs.shape[-1]
    if pos is not None:
        cos, sin = cos[pos], sin[pos]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    rot = xs[..., :r]
    if attrs.get("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., : r // 2], rot[..., r // 2:]
    real, imag = c * x1 - s * x2, s * x1 + c * x2
    if attrs.get("interleaved", 0):
        rotated = np.stack([real, imag], axis=-1).reshape(rot.shape)
    else:
        rotated = np.concatenate([real, imag], axis=-1)
    y = np.concatenate([rotated, xs[..., r:]], axis=-1).astype(x.dtype)
    return [y.transpose(0, 2, 1, 3) if x.ndim == 4 else y.reshape(x.shape)]


# ---------------------------------------------------------------------------------------------
# com.microsoft contrib ops found in onnxruntime-optimized exports


@kernel("com.microsoft.Gelu")
def ms_gelu(inputs, attrs):
    return [_gelu(inputs[0], "none")]


@kernel("com.microsoft.BiasGelu")
def ms_bias_gelu(inputs, attrs):
    return [_gelu(inputs[0] + inputs[1], "none")]


@kernel("com.microsoft.FastGelu")
def ms_fast_gelu(inputs, attrs):
    x, b = inputs[0], _opt(inputs, 1)
    return [_gelu(x if b is None else x + b, "tanh")]


@kernel("com.microsoft.QuickGelu")
def ms_quick_gelu(inputs, attrs):
    (x,) = inputs
    x32 = _f32(x)
    return [(x32 * _sigmoid(np.float32(attrs.get("alpha", 1.702)) * x32)).astype(x.dtype)]


@kernel("com.microsoft.SkipLayerNormalization")
def ms_skip_layer_norm(inputs, attrs):
    x, skip, gamma, beta, bias = (list(inputs) + [None] * 5)[:5]
    s = x + skip + (bias if bias is not None else 0)
    y, mu, inv = layer_normalization([s, gamma, beta], attrs)
    return [y, mu, inv, s]


@kernel("com.microsoft.SkipSimplifiedLayerNormalization")
def ms_skip_rms_norm(inputs, attrs):
    x, skip, gamma, bias = (list(inputs) + [None] * 4)[:4]
    s = x + skip + (bias if bias is not None else 0)
    y, inv = _rms(s, gamma, attrs)
    return [y, inv, inv, s]
