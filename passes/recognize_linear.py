"""Recognize projections and lookups: MatMul/Gemm with a constant weight (+ bias) -> linear,
Gather from a constant table -> embedding.

Requires: constants folded into parameters. Preserves: every value's type. The linear weight is
stored [N, K] (output rows contiguous: what GEMV kernels stream), derived lazily from ONNX's
[K, N] by a transpose; a transposed tied embedding becomes the embedding table itself again.
"""

from __future__ import annotations

from kiln.compiler.ir import Attrs, Derived, Graph, Param, TensorType
from kiln.compiler.shapes import dims_equal
from kiln.passes import register
from kiln.passes.patterns import Op, Var
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


@register("recognize_linear")
def recognize_linear(graph: Graph) -> Graph:
    graph = _recognize(graph)
    return rewrite(graph, [(FLATTENED, _unflatten)], ops=("Reshape",))


def _recognize(graph: Graph) -> Graph:
    return rewrite(graph, [
        (LINEAR_BIAS, lambda ed, n, b: _linear(ed, n, b, transposed=False)),
        (MATMUL, lambda ed, n, b: _linear(ed, n, b, transposed=False)),
        (GEMM_BIAS, _gemm),
        (GEMM, _gemm),
        (EMBEDDING, _embedding),
    ], ops=("Add", "MatMul", "Gemm", "Gather"))

