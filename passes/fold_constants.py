"""fold_constants: evaluate what is known before run time and make shape inputs static.

Requires: every value typed (run infer_shapes first). Preserves: graph inputs and outputs.
- A node whose inputs are all known (small params, or symbolic shape values from Shape) is
  evaluated: numeric results become Inline params; symbolic results (object arrays of dims) are
  remembered, and the nodes that computed them are dropped once nothing reads them.
- Shape-like inputs that are known turn into attributes (the folded forms documented in
  kiln.compiler.interpreter.onnx_ops): Reshape, Expand, ConstantOfShape, Range, Slice, Tile,
  Squeeze, Unsqueeze, Split, ReduceX, Pad, TopK, CumSum.
- Transpose, Cast and reshapes of a large param become lazy Derived params.
- Identity, Dropout, Where on a known condition, Expand/Reshape/Cast to what the input already
  is, and Mul/Div by ones or Add/Sub of zeros forward their input.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sympy

from kiln.compiler import shapes
from kiln.compiler.interpreter.onnx_ops import pad_widths, reshape_target, slice_params
from kiln.compiler.ir import Attrs, Derived, DType, Graph, Inline, Node, Param, TensorType
from kiln.compiler.shapes.onnx_ops import bcast, is_unknown, same_dim
from kiln.passes import register
from kiln.passes.infer_shapes import evaluate, input_symbols, merge_types

_REDUCES = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
            "ReduceSumSquare", "ReduceL2", "ReduceL1")


@register("fold_constants")
def fold_constants(graph: Graph, *, max_elements: int = 1 << 20,
                   max_float_elements: int = 1 << 16) -> Graph:
    """Fold known values; integer/bool results up to `max_elements` become params, float
    results only up to `max_float_elements` (so dequantization chains stay unfolded)."""
    return _Folder(graph, max_elements, max_float_elements).run()


class _Folder:
    def __init__(self, graph: Graph, max_elements: int, max_float_elements: int):
        self.graph = graph
        self.limit, self.float_limit = max_elements, max_float_elements
        self.types = dict(graph.types)
        self.params = dict(graph.params)
        self.known: dict[str, np.ndarray] = {}  # values known before run time
        self.rename: dict[str, str] = {}
        self.folded: set[str] = set()  # outputs of nodes kept only while something reads them
        self.bound = input_symbols(graph)
        self.keep = set(graph.outputs)

    def run(self) -> Graph:
        nodes = []
        for node in self.graph.nodes:
            node = Node(node.op, tuple(self.rename.get(v, v) for v in node.inputs),
                        node.outputs, node.attrs, node.name)
            kept = self.fold(node)
            if kept is not None:
                nodes.append(kept)
        nodes = self._sweep(nodes)
        outputs = tuple(self.rename.get(v, v) for v in self.graph.outputs)
        return self.graph.replace(nodes=tuple(nodes), types=self.types, params=self.params,
                                  outputs=outputs)

    # -- values ---------------------------------------------------------------------------

    def value(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.known:
            return self.known[name]
        p = self.params.get(name)
        if p is None or not p.source.available or p.type.shape is None:
            return None
        n = int(np.prod(p.type.shape, dtype=np.int64))
        if n > (self.float_limit if p.type.dtype.is_float else self.limit):
            return None
        self.known[name] = np.asarray(p.load())
        return self.known[name]

    def _all_known(self, node: Node) -> bool:
        return all(not v or v in self.known or self.value(v) is not None for v in node.inputs)

    # -- one node -------------------------------------------------------------------------

    def fold(self, node: Node) -> Node | None:
        """The node to keep (possibly rewritten), or None when it folded away."""
        if self._forward(node):
            return None
        reads_type = node.op in ("Shape", "Size")  # their value comes from the input's type
        if (reads_type or self._all_known(node)) and self._evaluate(node):
            return node if any(o in self.folded for o in node.outputs) else None
        if self._derive(node):
            return None
        rewrite = _STATIC.get(node.op)
        if rewrite is not None:
            new = rewrite(self, node)
            if new is not None and _all_attrs(new.attrs, self.bakeable):
                self._retype(new)
                return None if self._forward(new) else new
        return node

    def _evaluate(self, node: Node) -> bool:
        in_types = [self.types.get(v) if v else None for v in node.inputs]
        in_values = [self.value(v) for v in node.inputs]
        outs = evaluate(node, in_types, in_values, limit=self.limit, allow=self.bakeable)
        if any(o and x is None for o, x in zip(node.outputs, outs, strict=True)):
            return False
        if any(x.dtype.kind == "f" and x.size > self.float_limit for x in outs if x is not None):
            return False
        for out, x in zip(node.outputs, outs, strict=True):
            if not out:
                continue
            self.known[out] = x
            if x.dtype == object:
                self.folded.add(out)
            else:
                self.params[out] = Param(out, TensorType(DType.of(x), x.shape), Inline(x))
                self.types[out] = self.params[out].type
        return True

    def _derive(self, node: Node) -> bool:
        """Transpose/Cast/reshape of a param: a lazy Derived param instead of a node."""
        src = self.params.get(node.inputs[0]) if node.inputs else None
        out_t = self.types.get(node.outputs[0])
        if src is None or out_t is None or len(node.outputs) != 1:
            return False
        if node.op == "Transpose":
            attrs = {"perm": node.attrs.get("perm") or tuple(reversed(range(src.type.rank)))}
            fn = "transpose"
        elif node.op == "Cast":
            fn, attrs = "cast", {"dtype": node.attrs["to"]}
        elif node.op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten") and \
                all(isinstance(d, int) for d in out_t.shape or (None,)):
            fn, attrs = "reshape", {"shape": out_t.shape}
        else:
            return False
        out = node.outputs[0]
        self.params[out] = Param(out, out_t, Derived(fn, (src.source,), Attrs(attrs)))
        return True

    def _forward(self, node: Node) -> bool:
        """Replace the node's single used output by one of its inputs when they are equal."""
        src = _forward_source(self, node)
        out = node.outputs[0] if node.outputs else ""
        if src is None or out in self.keep:
            return False
        if any(o and o != out for o in node.outputs[1:]):
            return False
        self.rename[out] = src
        return True

    def bakeable(self, d) -> bool:
        """Whether a dim can go into an attribute: the interpreter binds all its symbols."""
        if isinstance(d, int):
            return True
        return not is_unknown(d) and all(s.name in self.bound for s in d.free_symbols)

    def _retype(self, node: Node) -> None:
        in_types = [self.types.get(v) if v else None for v in node.inputs]
        inferred = shapes.infer(node, in_types, [None] * len(in_types)) or []
        for out, t in zip(node.outputs, inferred, strict=False):
            if out:
                self.types[out] = merge_types(node, out, t, self.types.get(out), self.bound)

    def _sweep(self, nodes: list[Node]) -> list[Node]:
        """Drop the nodes that computed known symbolic values once nothing reads them."""
        used = set(self.graph.outputs) | {self.rename.get(v, v) for v in self.graph.outputs}
        kept = []
        for node in reversed(nodes):
            if any(o in used for o in node.outputs) or not all(
                    not o or o in self.folded for o in node.outputs):
                kept.append(node)
                used.update(v for v in node.inputs if v)
        return kept[::-1]


def _all_attrs(attrs: Attrs, ok: Callable[[sympy.Expr], bool]) -> bool:
    """Whether every symbolic dim in the attributes passes `ok`."""

    def good(v) -> bool:
        if isinstance(v, tuple):
            return all(good(x) for x in v)
        return not isinstance(v, sympy.Basic) or ok(v)

    return all(good(v) for v in attrs.values())


# ---------------------------------------------------------------------------------------------
# forwarding: outputs that equal an input


def _same_type(f: _Folder, a: str, b: str) -> bool:
    ta, tb = f.types.get(a), f.types.get(b)
    if ta is None or tb is None or ta.dtype != tb.dtype or ta.shape is None or tb.shape is None:
        return False
    return len(ta.shape) == len(tb.shape) and all(
        same_dim(x, y) is True for x, y in zip(ta.shape, tb.shape, strict=True))


def _forward_source(f: _Folder, node: Node) -> str | None:
    op, ins, out = node.op, node.inputs, node.outputs[0] if node.outputs else ""
    if op == "Identity" or (op == "Dropout" and (len(node.outputs) < 2 or not node.outputs[1])):
        return ins[0]
    if op in ("Expand", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Slice") and \
            _same_type(f, ins[0], out) and (op != "Slice" or _full_slice(f, node)):
        return ins[0]
    if op == "Where":
        cond = f.value(ins[0])
        if cond is not None and cond.dtype == np.bool_ and (cond.all() or not cond.any()):
            pick = ins[1] if cond.all() else ins[2]
            return pick if _same_type(f, pick, out) else None
    if op in _NEUTRAL:
        for i, j in ((0, 1), (1, 0)) if op in ("Add", "Mul") else ((0, 1),):
            c = f.value(ins[j])
            if c is not None and c.dtype != object and c.size and (c == _NEUTRAL[op]).all() \
                    and _same_type(f, ins[i], out):
                return ins[i]
    return None


_NEUTRAL = {"Add": 0, "Sub": 0, "Mul": 1, "Div": 1}


def _full_slice(f: _Folder, node: Node) -> bool:
    shape = f.types[node.inputs[0]].shape
    try:
        params = slice_params([f.value(v) for v in node.inputs], node.attrs, len(shape))
    except (TypeError, KeyError, IndexError):
        return False
    return all(s == 0 and t == 1 and isinstance(e, int) and e >= 2**31 - 1
               for _, s, e, t in params)


# ---------------------------------------------------------------------------------------------
# static attribute forms


def _attr_ints(v: np.ndarray) -> tuple:
    return tuple(int(x) if isinstance(x, int | np.integer) else x for x in np.ravel(v))


def _static(*, data: int, arg: int, attr: str, op: str | None = None) -> Callable:
    """A rewrite that moves known input `arg` into attribute `attr`, keeping inputs[:data]."""

    def rewrite(f: _Folder, node: Node) -> Node | None:
        v = f.value(node.inputs[arg]) if arg < len(node.inputs) else None
        if v is None:
            return None
        value = _attr_ints(v)
        return Node(op or node.op, node.inputs[:data], node.outputs,
                    node.attrs.updated(**{attr: value}), node.name)

    return rewrite


def _reshape(f: _Folder, node: Node) -> Node | None:
    x, target = f.types.get(node.inputs[0]), f.value(_at(node, 1))
    if target is None or x is None or x.shape is None:
        return None
    out = reshape_target(x.shape, _attr_ints(target), bool(node.attrs.get("allowzero", 0)))
    attrs = {k: v for k, v in node.attrs.items() if k != "allowzero"}
    return Node("Reshape", node.inputs[:1], node.outputs, Attrs({**attrs, "shape": out}),
                node.name)


def _expand(f: _Folder, node: Node) -> Node | None:
    x, target = f.types.get(node.inputs[0]), f.value(_at(node, 1))
    if target is None or x is None or x.shape is None:
        return None
    out = bcast(node, x.shape, _attr_ints(target))
    return Node("Expand", node.inputs[:1], node.outputs, Attrs({"shape": out}), node.name)


def _constant_of_shape(f: _Folder, node: Node) -> Node | None:
    target = f.value(_at(node, 0))
    if target is None:
        return None
    attrs = {"value": 0.0, "dtype": DType.f32, **dict(node.attrs), "shape": _attr_ints(target)}
    return Node(node.op, (), node.outputs, Attrs(attrs), node.name)


def _range(f: _Folder, node: Node) -> Node | None:
    vals = [f.value(v) for v in node.inputs[:3]]
    if any(v is None for v in vals):
        return None
    start, limit, delta = (_attr_ints(v)[0] if v.dtype.kind in "iO" else float(v.item())
                           for v in vals)
    attrs = {"start": start, "limit": limit, "delta": delta,
             "dtype": f.types[node.inputs[0]].dtype}
    return Node(node.op, (), node.outputs, Attrs(attrs), node.name)


def _slice(f: _Folder, node: Node) -> Node | None:
    x = f.types.get(node.inputs[0])
    if len(node.inputs) < 3 or x is None or x.shape is None:
        return None
    vals = [f.value(v) for v in node.inputs]
    if any(v and val is None for v, val in zip(node.inputs[1:], vals[1:], strict=True)):
        return None
    params = slice_params(vals, node.attrs, len(x.shape))
    attrs = {name: tuple(p[i] for p in params)
             for i, name in enumerate(("axes", "starts", "ends", "steps"))}
    attrs = {k: tuple(int(v) if isinstance(v, np.integer) else v for v in t)
             for k, t in attrs.items()}
    return Node(node.op, node.inputs[:1], node.outputs, Attrs(attrs), node.name)


def _pad(f: _Folder, node: Node) -> Node | None:
    x = f.types.get(node.inputs[0])
    vals = [f.value(v) if v else None for v in node.inputs]
    if x is None or x.shape is None or vals[1] is None or \
            any(v and val is None for v, val in zip(node.inputs[2:], vals[2:], strict=False)):
        return None
    widths = pad_widths(vals, node.attrs, len(x.shape))
    pads = tuple(int(b) for b, _ in widths) + tuple(int(e) for _, e in widths)
    value = vals[2].item() if len(vals) > 2 and vals[2] is not None and vals[2].size else 0
    attrs = {**dict(node.attrs), "pads": pads, "value": value}
    return Node(node.op, node.inputs[:1], node.outputs, Attrs(attrs), node.name)


def _at(node: Node, i: int) -> str:
    return node.inputs[i] if i < len(node.inputs) else ""


def _scalar_attr(attr: str) -> Callable:
    def rewrite(f: _Folder, node: Node) -> Node | None:
        v = f.value(_at(node, 1))
        if v is None or v.dtype == object:
            return None
        return Node(node.op, node.inputs[:1], node.outputs,
                    node.attrs.updated(**{attr: int(v.item())}), node.name)

    return rewrite


_STATIC: dict[str, Callable[[_Folder, Node], Node | None]] = {
    "Reshape": _reshape, "Expand": _expand, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Slice": _slice, "Pad": _pad,
    "Tile": _static(data=1, arg=1, attr="repeats"),
    "Squeeze": _static(data=1, arg=1, attr="axes"),
    "Unsqueeze": _static(data=1, arg=1, attr="axes"),
    "Split": _static(data=1, arg=1, attr="split"),
    "TopK": _scalar_attr("k"), "CumSum": _scalar_attr("axis"),
    **{op: _static(data=1, arg=1, attr="axes") for op in _REDUCES},
}
