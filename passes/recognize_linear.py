"""Recognize projections and lookups: MatMul/Gemm with a constant weight (+ bias) -> linear,
Gather from a constant table -> embedding, and a Slice of a projection's output features ->
a projection onto the selected rows (phi3's fused qkv_proj/gate_up_proj cut by Slice), which
fuse_projections fuses back into one linear and a Split that attention and activation
recognition see through. `cut_head_slices` does the same for a slice of the head dim after the
head split (GPT-NeoX's per-head [q|k|v] layout); recognize_rotary calls it once rotary has had
its chance at the partial-rotary slices (which are head-dim slices too).

Requires: constants folded into parameters. Preserves: every value's type. The linear weight is
stored [N, K] (output rows contiguous: what GEMV kernels stream), derived lazily from ONNX's
[K, N] by a transpose; a transposed tied embedding becomes the embedding table itself again.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.ir import Attrs, Derived, Graph, Node, Param, TensorType, inline_param
from kiln.compiler.shapes import dims_equal
from kiln.passes import register
from kiln.passes.patterns import Matcher, Op, Var
from kiln.passes.queries import (
    axis_is_last,
    int_list,
    last_axis_slice,
    perm_is,
    shape_of,
    slice_bounds,
)
from kiln.passes.rewrite import GraphEditor, rewrite


def _is_matrix(m, v: str) -> bool:
    t = m.graph.params.get(v)
    return t is not None and t.type.shape is not None and len(t.type.shape) == 2


W = Var("w", where=_is_matrix)
BIAS = Var("b", where=lambda m, v: v in m.graph.params and len(m.graph.params[v].type.shape or
                                                                   ()) == 1)
MATMUL = Op("MatMul", Var("x"), W, name="mm")
LINEAR_BIAS = Op("Add", MATMUL, BIAS)
GEMM = Op("Gemm", Var("x"), W, name="gemm", where=lambda m, n: n.attrs.get("transA", 0) == 0 and
          n.attrs.get("alpha", 1.0) == 1.0 and n.attrs.get("beta", 1.0) == 1.0)
GEMM_BIAS = Op("Gemm", Var("x"), W, BIAS, name="gemm",
               where=lambda m, n: n.attrs.get("transA", 0) == 0 and n.attrs.get("alpha", 1.0) == 1.0
               and n.attrs.get("beta", 1.0) == 1.0)
EMBEDDING = Op("Gather", Var("table", where=_is_matrix), Var("ids"),
               where=lambda m, n: n.attrs.get("axis", 0) == 0)


def weight_nk(ed: GraphEditor, w: str, *, transposed: bool) -> str:
    """The [N, K] parameter for a weight given as [K, N] (transposed=False) or [N, K]."""
    if transposed:
        return w
    p = ed.params[w]
    src = p.source
    if isinstance(src, Derived) and src.fn == "transpose" and len(src.sources) == 1:
        inner = next((q for q in ed.params.values() if q.source is src.sources[0]), None)
        if inner is not None:
            return inner.name  # transpose of a transpose: the original (tied embeddings)
    if f"{w}.T" in ed.params:
        return f"{w}.T"
    k, n = p.type.shape
    return ed.add_param(Param(f"{w}.T", TensorType(p.type.dtype, (n, k)),
                              Derived("transpose", (src,), Attrs({"perm": (1, 0)}))))


def _linear(ed: GraphEditor, node, b, *, transposed: bool) -> bool:
    x, w = b["x"], b["w"]
    xt = ed.types[x]
    if xt.shape is None or ed.types[w].dtype != xt.dtype:
        return False
    wk = weight_nk(ed, w, transposed=transposed)
    n_out = ed.types[wk].shape[0]
    bias = b.get("b")
    if bias is not None and ed.types[bias].shape != (n_out,):
        return False
    ed.emit("linear", [x, wk] + ([bias] if bias else []), name=node.name,
            outputs=[node.outputs[0]])
    return True


def _gemm(ed: GraphEditor, node, b) -> bool:
    return _linear(ed, node, b, transposed=bool(b["gemm"].attrs.get("transB", 0)))


def _embedding(ed: GraphEditor, node, b) -> bool:
    if not ed.types[b["ids"]].dtype.is_int:
        return False
    ed.emit("embedding", [b["table"], b["ids"]], name=node.name, outputs=[node.outputs[0]])
    return True


# torch's 2-D addmm form: Reshape [..., K] -> [M, K], linear, Reshape [M, N] -> [..., N]
FLATTENED = Op("Reshape", Op("linear", Op("Reshape", Var("t"), name="flat"), name="lin"),
               name="unflat")


def _unflatten(ed: GraphEditor, node, b) -> bool:
    """linear over the original leading dims, instead of over their flattened product."""
    t, lin = ed.types[b["t"]], b["lin"]
    flat, out = ed.types[b["flat"].outputs[0]], ed.types[node.outputs[0]]
    if t.shape is None or flat.shape is None or out.shape is None or len(flat.shape) != 2:
        return False
    lead = tuple(out.shape[:-1])
    if dims_equal(flat.shape[0], _product(lead)) is not True:
        return False
    x = b["t"]
    if tuple(t.shape[:-1]) != lead or t.shape[-1] != flat.shape[1]:
        x = ed.emit("Reshape", [x], {"shape": (*lead, flat.shape[1])},
                    name=f"{b['flat'].name}.unflat")[0]
    ed.emit("linear", [x, *lin.inputs[1:]], name=lin.name, outputs=[node.outputs[0]])
    return True


def _product(dims):
    p = 1
    for d in dims:
        p = p * d
    return p


# -- slices of projections ----------------------------------------------------------------

PROJ = Op("linear", Var("x"), name="lin")
CUT = Op("Slice", PROJ, name="cut")
HEADS = Op("Transpose", Op("Reshape", PROJ, name="split"), name="perm",
           where=perm_is(0, 2, 1, 3)) | Op("Reshape", PROJ, name="split")
HEAD_CUT = Op("Slice", HEADS, name="cut") | Op("Split", HEADS, name="cut", where=axis_is_last())
# Falcon's multi-query layout: [b, s, H + 2, D] cut along the head axis (Slice, or Gather of one)
HEAD_PICK = Op("Slice", Op("Reshape", PROJ, name="split"), name="pick") | \
    Op("Gather", Op("Reshape", PROJ, name="split"), Var("index"), name="pick",
       where=lambda m, n: n.attrs.get("axis", 0) in (2, -2))


def _rows(ed: GraphEditor, v: str, groups: int, start: int, stop: int) -> str:
    """Rows [g*width + start, g*width + stop) for each of `groups` groups of the [N, ...]
    parameter `v` (a linear's weight or bias), as a lazily derived parameter."""
    p = ed.params[v]
    n, rest = p.type.shape[0], tuple(p.type.shape[1:])
    width = n // groups
    name = f"{v}[{start}:{stop}]" if groups == 1 else f"{v}[{groups}x{width}][{start}:{stop}]"
    if name in ed.params:
        return name
    src = Derived("reshape", (p.source,), Attrs({"shape": (groups, width, *rest)}))
    src = Derived("slice", (src,), Attrs({"axis": 1, "start": start, "stop": stop}))
    rows = groups * (stop - start)
    src = Derived("reshape", (src,), Attrs({"shape": (rows, *rest)}))
    return ed.add_param(Param(name, TensorType(p.type.dtype, (rows, *rest)), src))


def _cut_bounds(m: Matcher, cut: Node, width) -> tuple[int, int] | None:
    bounds = last_axis_slice(m, cut)
    if bounds is None or bounds[2] != 1 or not isinstance(width, int) or \
            not 0 <= bounds[0] < bounds[1] <= width:
        return None
    return bounds[0], bounds[1]


def _only_used_by(consumers: dict, outputs, value: str, ops: tuple[str, ...]) -> bool:
    users = consumers.get(value, [])
    return value not in outputs and bool(users) and all(u.op in ops for u in users)


def _project(ed: GraphEditor, lin: Node, groups: int, start: int, stop: int, **kw) -> str:
    inputs = [lin.inputs[0]] + [_rows(ed, v, groups, start, stop) for v in lin.inputs[1:] if v]
    return ed.emit("linear", inputs, name=f"{lin.name}[{start}:{stop}]", **kw)[0]


def _sliced(consumers: dict):
    def build(ed: GraphEditor, node, b) -> bool:
        lin = b["lin"]
        if not _only_used_by(consumers, ed.graph.outputs, lin.outputs[0], ("Slice",)) or \
                any(v and v not in ed.params for v in lin.inputs[1:]):
            return False
        cut = _cut_bounds(ed.matcher, b["cut"], (shape_of(ed.matcher, lin.outputs[0]) or
                                                  (None,))[-1])
        if cut is None:
            return False
        _project(ed, lin, 1, *cut, outputs=[node.outputs[0]])
        return True

    return build


def _sole_path(consumers: dict, outputs, b: dict) -> bool:
    """Whether the projection feeds only the head split, and the split only the cuts."""
    lin, split = b["lin"], b["split"]
    last = b["perm"].outputs[0] if "perm" in b else split.outputs[0]
    used = (lin.outputs[0], ("Reshape",)), (last, ("Slice", "Split"))
    if "perm" in b:
        used = (*used, (split.outputs[0], ("Transpose",)))
    return all(_only_used_by(consumers, outputs, v, ops) for v, ops in used)


def _head_cuts(m: Matcher, cut: Node, width) -> list[tuple[int, int]] | None:
    """[(start, stop)] of each output of a Slice or Split of the last (head) axis."""
    if cut.op == "Slice":
        bounds = _cut_bounds(m, cut, width)
        return None if bounds is None else [bounds]
    sizes = int_list(m, cut, "split", 1)
    if sizes is None and isinstance(width, int) and width % len(cut.outputs) == 0:
        sizes = (width // len(cut.outputs),) * len(cut.outputs)
    if sizes is None or len(sizes) != len(cut.outputs) or sum(sizes) != width:
        return None
    ends = np.cumsum(sizes).tolist()
    return [(e - n, e) for n, e in zip(sizes, ends, strict=True)]


def _emit_head_cut(ed: GraphEditor, b: dict, heads: int, cut: tuple[int, int], out: str) -> None:
    """heads(linear(x, the rows of `cut` in every head)) as the value `out`."""
    name = f"{b['cut'].name}[{cut[0]}:{cut[1]}]"
    shape = ed.add_param(inline_param(f"{name}.heads",
                                      np.array([0, 0, heads, cut[1] - cut[0]], np.int64)))
    flat = _project(ed, b["lin"], heads, *cut)
    if "perm" not in b:
        ed.emit("Reshape", [flat, shape], name=f"{name}.split", outputs=[out])
        return
    split = ed.emit("Reshape", [flat, shape], name=f"{name}.split")[0]
    ed.emit("Transpose", [split], {"perm": (0, 2, 1, 3)}, name=f"{name}.heads", outputs=[out])


def _head_sliced(consumers: dict):
    def build(ed: GraphEditor, node, b) -> bool:
        m, lin = ed.matcher, b["lin"]
        heads, flat = shape_of(m, b["split"].outputs[0]), shape_of(m, lin.outputs[0])
        if heads is None or flat is None or len(heads) != 4 or len(flat) != 3 or \
                tuple(heads[:2]) != tuple(flat[:2]) or not isinstance(heads[2], int) or \
                any(v and v not in ed.params for v in lin.inputs[1:]) or \
                not _sole_path(consumers, ed.graph.outputs, b):
            return False
        cuts = _head_cuts(m, b["cut"], heads[3])
        if cuts is None or cuts == [(0, heads[3])]:
            return False
        for cut, out in zip(cuts, node.outputs, strict=True):
            _emit_head_cut(ed, b, heads[2], cut, out)
        return True

    return build


def _picked_heads(m: Matcher, b: dict, heads: int) -> tuple[int, int] | None:
    """(first, stop) of the heads a Slice or a one-element Gather takes from axis 2."""
    pick = b["pick"]
    if pick.op == "Gather":
        index, shape = m.const(b["index"]), shape_of(m, b["index"])
        if index is None or shape is None or tuple(shape) != (1,):
            return None
        i = int(index.reshape(-1)[0])
        i = i + heads if i < 0 else i
        return (i, i + 1) if 0 <= i < heads else None
    bounds = slice_bounds(m, pick)
    if bounds is None or len(bounds) != 1 or bounds[0][0] != 2 or bounds[0][3] != 1:
        return None
    start, stop = bounds[0][1:3]
    return (start, stop) if 0 <= start < stop <= heads else None


def _head_picked(consumers: dict):
    def build(ed: GraphEditor, node, b) -> bool:
        m, lin, split = ed.matcher, b["lin"], b["split"]
        heads, flat = shape_of(m, split.outputs[0]), shape_of(m, lin.outputs[0])
        outputs = ed.graph.outputs
        if heads is None or flat is None or len(heads) != 4 or len(flat) != 3 or \
                tuple(heads[:2]) != tuple(flat[:2]) or not isinstance(heads[2], int) or \
                not isinstance(heads[3], int) or \
                any(v and v not in ed.params for v in lin.inputs[1:]) or \
                not _only_used_by(consumers, outputs, lin.outputs[0], ("Reshape",)) or \
                not _only_used_by(consumers, outputs, split.outputs[0], ("Slice", "Gather")):
            return False
        picked = _picked_heads(m, b, heads[2])
        if picked is None or picked == (0, heads[2]):
            return False
        d = heads[3]
        flat_cut = _project(ed, lin, 1, picked[0] * d, picked[1] * d)
        shape = ed.add_param(inline_param(f"{node.name}.heads", np.array(
            [0, 0, picked[1] - picked[0], d], np.int64)))
        ed.emit("Reshape", [flat_cut, shape], name=f"{node.name}.split", outputs=[node.outputs[0]])
        return True

    return build


UNSQUEEZED_CUT = Op("Split", Op("Unsqueeze", PROJ, name="unsq"), name="cut",
                    where=axis_is_last())


def _unsqueezed_split(consumers: dict):
    """Split(Unsqueeze(linear(x)), last axis) -> Unsqueeze(linear(x, rows)) per output
    (GPT-BigCode's c_attn, cut after a head axis was inserted)."""
    def build(ed: GraphEditor, node, b) -> bool:
        m, lin, unsq, outputs = ed.matcher, b["lin"], b["unsq"], ed.graph.outputs
        width = (shape_of(m, lin.outputs[0]) or (None,))[-1]
        if int_list(m, unsq, "axes", 1) not in ((0,), (1,)) or \
                any(v and v not in ed.params for v in lin.inputs[1:]) or \
                not _only_used_by(consumers, outputs, lin.outputs[0], ("Unsqueeze",)) or \
                not _only_used_by(consumers, outputs, unsq.outputs[0], ("Split",)):
            return False
        cuts = _head_cuts(m, node, width)
        if cuts is None:
            return False
        axes = ed.add_param(inline_param(f"{node.name}.axes", np.array(
            int_list(m, unsq, "axes", 1), np.int64)))
        for cut, out in zip(cuts, node.outputs, strict=True):
            ed.emit("Unsqueeze", [_project(ed, lin, 1, *cut), axes],
                    name=f"{node.name}[{cut[0]}:{cut[1]}]", outputs=[out])
        return True

    return build


def cut_head_slices(graph: Graph) -> Graph:
    """Slice(heads(linear(x)))[..., a:b] -> heads(linear(x, rows a:b of every head)); likewise
    each output of a Split of the head dim (CodeGen's fused qkv), and a Slice or Gather of whole
    heads (Falcon's [b, s, H + 2, D] multi-query layout)."""
    consumers = graph.consumers()
    rules = [(HEAD_CUT, _head_sliced(consumers)), (HEAD_PICK, _head_picked(consumers)),
             (UNSQUEEZED_CUT, _unsqueezed_split(consumers))]
    return rewrite(graph, rules, ops=("Slice", "Split", "Gather"))


@register("recognize_linear")
def recognize_linear(graph: Graph) -> Graph:
    graph = _recognize(graph)
    graph = rewrite(graph, [(FLATTENED, _unflatten)], ops=("Reshape",))
    return rewrite(graph, [(CUT, _sliced(graph.consumers()))], ops=("Slice",))


def _recognize(graph: Graph) -> Graph:
    return rewrite(graph, [
        (LINEAR_BIAS, lambda ed, n, b: _linear(ed, n, b, transposed=False)),
        (MATMUL, lambda ed, n, b: _linear(ed, n, b, transposed=False)),
        (GEMM_BIAS, _gemm),
        (GEMM, _gemm),
        (EMBEDDING, _embedding),
    ], ops=("Add", "MatMul", "Gemm", "Gather"))

