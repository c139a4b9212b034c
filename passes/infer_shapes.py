"""infer_shapes: type every value, propagating known shape values through shape arithmetic.

Requires: graph inputs, outputs and params typed (the frontend's contract); intermediate values
may be untyped. Preserves: nodes, params and values; only `Graph.types` changes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import numpy as np
import sympy

from kiln.compiler import shapes
from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import KERNELS
from kiln.compiler.interpreter.onnx_ops import normalize
from kiln.compiler.ir import Dim, Graph, Node, Param, TensorType
from kiln.compiler.shapes.onnx_ops import is_unknown, same_dim
from kiln.passes import register

#: values larger than this are never propagated (shape tensors are tiny)
MAX_VALUE_ELEMENTS = 1024


@register("infer_shapes")
def infer_shapes(graph: Graph, *, strict: bool = True) -> Graph:
    """Infer every node output's type and reconcile it with any declared type.

    A declared type that provably contradicts the inferred one raises KilnError; otherwise the
    more specific of the two is kept dim by dim. With `strict`, an output whose type can be
    neither inferred (no rule, untyped inputs) nor read from a declaration raises; without it
    that output stays untyped.
    """
    types = dict(graph.types)
    bound = input_symbols(graph)
    values = small_int_params(graph.params)
    for node in graph.nodes:
        in_types = [types.get(v) if v else None for v in node.inputs]
        in_values = [values.get(v) if v else None for v in node.inputs]
        inferred = _infer(node, in_types, in_values)
        for i, out in enumerate(node.outputs):
            if not out:
                continue
            want = inferred[i] if inferred is not None and i < len(inferred) else None
            merged = merge_types(node, out, want, types.get(out), bound)
            if merged is None:
                if strict:
                    raise KilnError(f"node {node.name} ({node.op}): cannot infer the type of "
                                    f"{out} (inputs {', '.join(map(str, in_types))})")
                continue
            types[out] = merged
        in_types = [types.get(v) if v else None for v in node.inputs]
        for out, value in zip(node.outputs, evaluate(node, in_types, in_values), strict=False):
            if out and value is not None:
                values[out] = value
    return graph.replace(types=types)


def _infer(node: Node, in_types: Sequence[TensorType | None],
           in_values: Sequence[np.ndarray | None]) -> list[TensorType] | None:
    if any(v and t is None for v, t in zip(node.inputs, in_types, strict=True)):
        return None
    try:
        return shapes.infer(node, in_types, in_values)
    except KilnError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError, OverflowError) as e:
        # a type rule meeting inputs or attributes that make no sense together (a rewired or
        # corrupted graph): name the node rather than show the rule's traceback
        first = str(e).splitlines()[0] if str(e) else ""
        raise KilnError(f"node {node.name} ({node.op}): invalid inputs or attributes (inputs "
                        f"{', '.join(map(str, in_types))}; {type(e).__name__}: {first})") from e


def input_symbols(graph: Graph) -> set[str]:
    """Names of the symbols that graph inputs bind (the ones the interpreter can evaluate)."""
    names: set[str] = set()
    for v in graph.inputs:
        for d in graph.types[v].shape or ():
            if not isinstance(d, int):
                names |= {s.name for s in d.free_symbols}
    return names


def small_int_params(params: Mapping[str, Param]) -> dict[str, np.ndarray]:
    """Loaded values of the small integer and bool params (candidate shape tensors)."""
    out = {}
    for name, p in params.items():
        t = p.type
        if t.dtype.is_float or t.shape is None or not p.source.available:
            continue
        if int(np.prod(t.shape, dtype=np.int64)) <= MAX_VALUE_ELEMENTS:
            out[name] = np.asarray(p.load())
    return out


# ---------------------------------------------------------------------------------------------
# values


def evaluate(node: Node, in_types: Sequence[TensorType | None],
             in_values: Sequence[np.ndarray | None], *,
             limit: int = MAX_VALUE_ELEMENTS,
             allow: Callable[[Dim], bool] = lambda d: True) -> list[np.ndarray | None]:
    """Output values of `node` when they can be known before running the graph, else Nones.

    Shape and Size read the input's type (dims `allow` rejects make them unknown); other ops run
    their kernel when every present input is known and no larger than `limit` elements.
    Comparisons that depend on symbol values, and kernels that fail, give unknown values.
    """
    nothing: list[np.ndarray | None] = [None] * len(node.outputs)
    if node.op in ("Shape", "Size"):
        t = in_types[0]
        if t is None or t.shape is None or not all(allow(d) for d in t.shape):
            return nothing
        return [shape_value(node, t.shape)]
    if node.op not in KERNELS or any(v and x is None for v, x in zip(node.inputs, in_values,
                                                                     strict=True)):
        return nothing
    if any(x is not None and x.size > limit for x in in_values):
        return nothing
    try:
        outs = KERNELS[node.op](list(in_values), node.attrs)
    except Exception:  # an unknowable value (symbolic comparison) or a bad input: not known
        return nothing
    outs = [normalize(np.asarray(o)) if np.asarray(o).dtype == object else np.asarray(o)
            for o in outs]
    return [o if o.size <= limit else None for o in outs[:len(node.outputs)]]


def shape_value(node: Node, dims: Sequence[Dim]) -> np.ndarray:
    """The value of Shape (with start/end) or Size over symbolic dims."""
    if node.op == "Size":
        return normalize(np.array(sympy.Mul(*dims), dtype=object))
    start, end = node.attrs.get("start", 0), node.attrs.get("end")
    picked = list(dims)[start:end]
    arr = np.empty(len(picked), dtype=object)
    arr[:] = picked
    return normalize(arr)


# ---------------------------------------------------------------------------------------------
# reconciling inferred and declared types


def merge_types(node: Node, value: str, inferred: TensorType | None,
                declared: TensorType | None, bound: Collection[str]) -> TensorType | None:
    """The more specific of two types of one value; KilnError when they provably differ."""
    if inferred is None or declared is None:
        return declared or inferred
    if not _agree(inferred, declared):
        raise KilnError(f"node {node.name} ({node.op}): output {value} is declared {declared} "
                        f"but inferred {inferred}")
    if inferred.shape is None:
        return declared
    if declared.shape is None:
        return TensorType(declared.dtype, inferred.shape)
    dims = tuple(_pick(a, b, bound) for a, b in zip(inferred.shape, declared.shape, strict=True))
    return TensorType(declared.dtype, dims)


def _agree(a: TensorType, b: TensorType) -> bool:
    if a.dtype != b.dtype:
        return False
    if a.shape is None or b.shape is None:
        return True
    return len(a.shape) == len(b.shape) and all(
        same_dim(x, y) is not False for x, y in zip(a.shape, b.shape, strict=True))


def _specificity(d: Dim, bound: Collection[str]) -> int:
    """0: an int; 1: an expression over input-bound symbols; 2: anything vaguer."""
    if isinstance(d, int):
        return 0
    if is_unknown(d) or any(s.name not in bound for s in d.free_symbols):
        return 2
    return 1


def _pick(inferred: Dim, declared: Dim, bound: Collection[str]) -> Dim:
    if _specificity(inferred, bound) < _specificity(declared, bound):
        return inferred
    return declared
