"""Read the static facts of folded nodes (target shapes, slice bounds, axes), whether the
frontend gave them as constant inputs or constant folding turned them into attributes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kiln.compiler.ir import Dim, Node
from kiln.passes.patterns import Matcher

INT_MAX = 2**62


def int_list(m: Matcher, node: Node, attr: str, index: int | None) -> tuple | None:
    """An integer list given as attribute `attr` or as the constant input `index`."""
    if attr in node.attrs:
        v = node.attrs[attr]
        return tuple(v) if isinstance(v, tuple) else (v,)
    if index is not None and len(node.inputs) > index and node.inputs[index]:
        arr = m.const(node.inputs[index])
        if arr is not None:
            return tuple(int(x) for x in np.asarray(arr).reshape(-1))
    return None


def reshape_target(m: Matcher, node: Node) -> tuple[Dim, ...] | None:
    """The output shape of a Reshape (its inferred type: 0 and -1 already resolved)."""
    t = m.graph.types.get(node.outputs[0])
    return None if t is None or t.shape is None else tuple(t.shape)


def perm_is(*perm: int):
    """A `where` predicate: a Transpose with exactly this permutation."""
    return lambda m, n: tuple(n.attrs.get("perm", ())) == perm


def axis_is_last(attr: str = "axis"):
    def check(m: Matcher, n: Node) -> bool:
        rank = m.graph.types[n.inputs[0]].rank
        a = n.attrs.get(attr, -1)
        return a == -1 or (rank is not None and a == rank - 1)

    return check


def slice_bounds(m: Matcher, node: Node) -> list[tuple[int, int, int, int]] | None:
    """[(axis, start, stop, step)] of a Slice, axes normalized to non-negative, stops clamped
    to the static dim where it is known; None when the bounds are not static."""
    starts = int_list(m, node, "starts", 1)
    ends = int_list(m, node, "ends", 2)
    if starts is None or ends is None:
        return None
    rank = m.graph.types[node.inputs[0]].rank
    axes = int_list(m, node, "axes", 3) or tuple(range(len(starts)))
    steps = int_list(m, node, "steps", 4) or (1,) * len(starts)
    shape = m.graph.types[node.inputs[0]].shape or ()
    out = []
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        a = a + rank if a < 0 and rank is not None else a
        d = shape[a] if a < len(shape) else None
        if isinstance(d, int):
            s = max(0, min(d, s + d if s < 0 else s))
            e = max(0, min(d, e + d if e < 0 else e))
        out.append((a, s, e, st))
    return out


def last_axis_slice(m: Matcher, node: Node) -> tuple[int, int, int] | None:
    """(start, stop, step) of a Slice that cuts only the last axis of a static-last-dim tensor."""
    b = slice_bounds(m, node)
    rank = m.graph.types[node.inputs[0]].rank
    if b is None or rank is None or len(b) != 1 or b[0][0] != rank - 1:
        return None
    return b[0][1:]


def scalar(m: Matcher, value: str) -> float | None:
    arr = m.const(value)
    if arr is None or arr.size != 1:
        return None
    return float(np.asarray(arr).reshape(-1)[0])


def shape_of(m: Matcher, value: str) -> Sequence[Dim] | None:
    t = m.graph.types.get(value)
    return None if t is None else t.shape
