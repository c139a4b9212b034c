"""Recognize rotary position embeddings applied to attention heads -> rotary.

    x*cos + rotate_half(x)*sin,  rotate_half(x) = concat(-x[..., h:2h], x[..., :h])
    x*cos + rotate_pairs(x)*sin, rotate_pairs(x) = stack(-x[..., 1::2], x[..., ::2]) flattened
                                 (GPT-J's interleaved rotary; cos/sin repeat each frequency twice)

where x is a projection split into heads, [b, H, s, D] (Reshape then Transpose), [b, s, H, D]
(Reshape only) or a single head [b, 1, s, D] (Unsqueeze), and cos/sin broadcast over heads from
[b|1, s, R]. R < D (partial rotary) is recognized when the unrotated tail is concatenated back.
The canonical rotary works on the flat projection [b, s, H*D]; the head split is re-emitted after
it, for attention recognition to absorb.
Once rotary has matched, head-dim slices of a projection that remain (GPT-NeoX's per-head
[q|k|v] layout, CodeGen's Split) become projections of their own, chains of Reshapes collapse
into one, and rotary is matched again.

Requires: constants folded, linear recognized. Preserves: types.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.ir import Graph, inline_param
from kiln.passes import register
from kiln.passes.patterns import Matcher, Op, Var
from kiln.passes.queries import axis_is_last, int_list, last_axis_slice, perm_is, shape_of
from kiln.passes.recognize_linear import cut_head_slices
from kiln.passes.rewrite import GraphEditor, rewrite

X = Var("x")
ROTATE_HALF = Op("Concat", Op("Neg", Op("Slice", X, name="hi")), Op("Slice", X, name="lo"),
                 name="cat")
ROPE = Op("Add", Op("Mul", X, Var("cos")), Op("Mul", ROTATE_HALF, Var("sin")))
PARTIAL_ROPE = Op("Concat", ROPE, Op("Slice", Var("full"), name="tail"), name="outer")


def _new_last_axis(m: Matcher, n) -> bool:
    """An Unsqueeze appending one trailing axis (axes == (-1,) or (rank,))."""
    rank = shape_of(m, n.inputs[0])
    axes = int_list(m, n, "axes", 1)
    return rank is not None and axes in ((-1,), (len(rank),))


ODD = Op("Unsqueeze", Op("Neg", Op("Slice", X, name="odd")), where=_new_last_axis)
EVEN = Op("Unsqueeze", Op("Slice", X, name="even"), where=_new_last_axis)
ROTATE_PAIRS = Op("Reshape", Op("Concat", ODD, EVEN, name="cat", where=axis_is_last()),
                  name="pairs")
ROPE_PAIRS = Op("Add", Op("Mul", X, Var("cos")), Op("Mul", ROTATE_PAIRS, Var("sin")))
PARTIAL_ROPE_PAIRS = Op("Concat", ROPE_PAIRS, Op("Slice", Var("full"), name="tail"),
                        name="outer")

HEADS_BHSD = Op("Transpose", Op("Reshape", Var("flat"), name="split"), where=perm_is(0, 2, 1, 3))
HEADS_BSHD = Op("Reshape", Var("flat"), name="split")
# a single head [b, 1, s, D] made by inserting the head axis (GPT-BigCode's multi-query k, v)
ONE_HEAD = Op("Unsqueeze", Var("flat"), name="split",
              where=lambda m, n: int_list(m, n, "axes", 1) in ((1,), (-3,)))


def _halves(m: Matcher, b: dict) -> int | None:
    """The rotary dim R when `lo` is x[..., :R/2] and `hi` is x[..., R/2:R] (else None)."""
    lo, hi = last_axis_slice(m, b["lo"]), last_axis_slice(m, b["hi"])
    if lo is None or hi is None or lo[2] != 1 or hi[2] != 1 or lo[0] != 0:
        return None
    half = lo[1]
    if hi[0] != half or hi[1] - half != half:
        return None
    return 2 * half


def _pairs(m: Matcher, b: dict) -> int | None:
    """The rotary dim R when `even`/`odd` are x[..., 0::2], x[..., 1::2], stacked on a new last
    axis and flattened back to x's shape."""
    x = shape_of(m, b["x"])
    even, odd = last_axis_slice(m, b["even"]), last_axis_slice(m, b["odd"])
    cat_out, out = shape_of(m, b["cat"].outputs[0]), shape_of(m, b["pairs"].outputs[0])
    if x is None or even is None or odd is None or cat_out is None or out is None or \
            not isinstance(x[-1], int) or x[-1] % 2:
        return None
    r = x[-1]
    if even != (0, r, 2) or odd != (1, r, 2) or tuple(out) != tuple(x) or \
            tuple(cat_out) != (*x[:-1], r // 2, 2):
        return None
    return r


def _table_3d(ed: GraphEditor, m: Matcher, v: str, head_axis: int, r: int) -> str | None:
    """cos/sin as [b|1, s, R]: strip the Unsqueeze that broadcast it over heads."""
    node = m.producer.get(v)
    if node is not None and node.op == "Unsqueeze":
        axes = int_list(m, node, "axes", 1)
        src = node.inputs[0]
        if axes in ((head_axis,), (head_axis - 4,)) and (shape_of(m, src) or (0,))[-1] == r:
            return src
    shape = shape_of(m, v)
    if shape is not None and len(shape) == 4 and shape[head_axis] == 1 and shape[-1] == r:
        axes = ed.add_param(inline_param(f"{v}.squeeze_axes", np.array([head_axis], np.int64)))
        return ed.emit("Squeeze", [v, axes], name=f"{v}.squeeze")[0]
    return None


def split_heads(m: Matcher, x: str) -> tuple[str, int, int, int] | None:
    """(flat projection, H, D, head axis) when x splits [b, s, H*D] into heads."""
    for pattern, head_axis in ((HEADS_BHSD, 1), (HEADS_BSHD, 2), (ONE_HEAD, 1)):
        b = m.first(pattern, x)
        if b is None:
            continue
        shape, flat = shape_of(m, x), shape_of(m, b["flat"])
        if shape is None or flat is None or len(shape) != 4 or len(flat) != 3:
            continue
        h, d = shape[head_axis], shape[3]
        if isinstance(h, int) and isinstance(d, int) and flat[2] == h * d and \
                tuple(flat[:2]) == (shape[0], shape[3 - head_axis]):
            return b["flat"], h, d, head_axis
    return None


def _emit_rotary(ed: GraphEditor, m: Matcher, node, b: dict, x: str, r: int,
                 interleaved: bool) -> bool:
    heads = split_heads(m, x)
    if heads is None:
        return False
    flat, h, d, head_axis = heads
    cos, sin = (_table_3d(ed, m, b[k], head_axis, r) for k in ("cos", "sin"))
    if cos is None or sin is None or ed.types[cos].dtype != ed.types[flat].dtype:
        return False
    rotated = ed.emit("rotary", [flat, cos, sin], {"num_heads": h, "head_dim": d,
                                                   "interleaved": interleaved},
                      name=node.name)[0]
    shape = ed.add_param(inline_param(f"{node.name}.heads", np.array([0, 0, h, d], np.int64)))
    if head_axis == 2:
        ed.emit("Reshape", [rotated, shape], name=f"{node.name}.split",
                outputs=[node.outputs[0]])
        return True
    split = ed.emit("Reshape", [rotated, shape], name=f"{node.name}.split")[0]
    ed.emit("Transpose", [split], {"perm": (0, 2, 1, 3)}, name=f"{node.name}.heads",
            outputs=[node.outputs[0]])
    return True


def _rotary_dim(m: Matcher, b: dict) -> tuple[int | None, bool]:
    """(R, interleaved) of the rotation matched in `b`."""
    if "pairs" in b:
        return _pairs(m, b), True
    return _halves(m, b), False


def _full(ed: GraphEditor, node, b) -> bool:
    m = ed.matcher
    r, interleaved = _rotary_dim(m, b)
    if r is None or (shape_of(m, b["x"]) or (None,))[-1] != r:
        return False
    return _emit_rotary(ed, m, node, b, b["x"], r, interleaved)


def _partial(ed: GraphEditor, node, b) -> bool:
    m = ed.matcher
    r, interleaved = _rotary_dim(m, b)
    x_node, tail = m.producer.get(b["x"]), last_axis_slice(m, b["tail"])
    if r is None or x_node is None or x_node.op != "Slice" or tail is None:
        return False
    head = last_axis_slice(m, x_node)
    d = (shape_of(m, b["full"]) or (None,))[-1]
    if x_node.inputs[0] != b["full"] or head != (0, r, 1) or tail != (r, d, 1):
        return False
    return _emit_rotary(ed, m, node, b, b["full"], r, interleaved)


CHAIN = Op("Reshape", Op("Reshape", Var("x")) | Op("Unsqueeze", Var("x")))


def _collapse(ed: GraphEditor, node, b) -> bool:
    """Reshape(Reshape(x)) -> Reshape(x) where it splits a flat [b, s, H*D] into heads
    [b, s, H, D] by a detour (CodeGen's [.., H, 1, D] round trip, GPT-BigCode's Unsqueeze)."""
    src = b["x"]
    while (p := ed.matcher.producer.get(src)) is not None and p.op in ("Reshape", "Unsqueeze"):
        src = p.inputs[0]
    out, flat = ed.types[node.outputs[0]].shape, ed.types[src].shape
    if out is None or flat is None or len(out) != 4 or len(flat) != 3 or \
            tuple(out[:2]) != tuple(flat[:2]) or not all(isinstance(d, int) for d in out[2:]):
        return False
    shape = ed.add_param(inline_param(f"{node.name}.heads", np.array([0, 0, *out[2:]],
                                                                      np.int64)))
    ed.emit("Reshape", [src, shape], name=node.name, outputs=[node.outputs[0]])
    return True


RULES = [(PARTIAL_ROPE, _partial), (PARTIAL_ROPE_PAIRS, _partial), (ROPE, _full),
         (ROPE_PAIRS, _full)]


@register("recognize_rotary")
def recognize_rotary(graph: Graph) -> Graph:
    graph = rewrite(graph, RULES, ops=("Add", "Concat"))
    graph = rewrite(cut_head_slices(graph), [(CHAIN, _collapse)], ops=("Reshape",))
    return rewrite(graph, RULES, ops=("Add", "Concat"))
