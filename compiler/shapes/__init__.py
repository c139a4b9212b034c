"""Type and shape inference rules, one per op, over symbolic dimensions.

A rule takes the node, its input types (None where unknown or omitted) and the inputs' known
constant values (numpy arrays, None where not known; integer "shape tensors" may be object arrays
whose elements are sympy expressions), and returns the output types. Rules raise KilnError naming
the node, op and shapes when the inputs contradict each other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import sympy

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Dim, Node, Shape, TensorType, shape_str

Rule = Callable[[Node, Sequence[TensorType | None], Sequence[np.ndarray | None]],
                Sequence[TensorType]]
RULES: dict[str, Rule] = {}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return register


def infer(node: Node, types: Sequence[TensorType | None],
          values: Sequence[np.ndarray | None] | None = None) -> list[TensorType] | None:
    """Output types of `node`, or None when no rule is registered for its op."""
    fn = RULES.get(node.op)
    if fn is None:
        return None
    values = values if values is not None else [None] * len(types)
    try:
        return list(fn(node, types, values))
    except (AttributeError, TypeError, ValueError, IndexError, ArithmeticError) as e:
        # a rule tripping over an input its op does not take (a float shape, say): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise fail(node, f"cannot infer its output types: {type(e).__name__}: {first}",
                   *types) from e


def fail(node: Node, message: str, *types: TensorType | None) -> KilnError:
    shapes = ", ".join(str(t) if t is not None else "?" for t in types)
    return KilnError(f"node {node.name} ({node.op}): {message}" + (f" [{shapes}]" if types
                                                                     else ""))


def dims_equal(a: Dim, b: Dim) -> bool | None:
    """True/False when provably equal/unequal, None when it depends on symbol values."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    diff = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
    if diff == 0:
        return True
    if diff.is_number:
        return False
    return None


def broadcast(node: Node, *shapes: Shape) -> Shape:
    """Numpy broadcasting over symbolic dims; contradictions raise naming the node."""
    rank = max(len(s) for s in shapes)
    padded = [(1,) * (rank - len(s)) + tuple(s) for s in shapes]
    out: list[Dim] = []
    for dims in zip(*padded, strict=True):
        known = [d for d in dims if not (isinstance(d, int) and d == 1)]
        if not known:
            out.append(1)
            continue
        first = known[0]
        for d in known[1:]:
            if dims_equal(first, d) is False:
                raise KilnError(f"node {node.name} ({node.op}): shapes "
                                f"{', '.join(shape_str(s) for s in shapes)} do not broadcast")
        # prefer a concrete dim when one is known
        out.append(next((d for d in known if isinstance(d, int)), first))
    return tuple(out)


def types_agree(inferred: TensorType, declared: TensorType) -> bool:
    """False only when the two types provably contradict each other."""
    if inferred.dtype != declared.dtype:
        return False
    if inferred.shape is None or declared.shape is None:
        return True
    if len(inferred.shape) != len(declared.shape):
        return False
    return all(dims_equal(a, b) is not False for a, b in zip(inferred.shape, declared.shape,
                                                               strict=True))


def _load_rules() -> None:
    from kiln.compiler.shapes import onnx_ops, transformer_ops  # noqa: F401


_load_rules()
