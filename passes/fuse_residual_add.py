"""Group a linear with the residual Add that alone reads its output (`residual_add`): the Add
becomes the epilogue of the linear's kernel (GEMV or GEMM), one pass over the output.

Group: (linear, Add); when both operands of an Add are such linears, each gets a group (the
lowering fuses the one whose other operand is ready). Requires: linears recognized. Preserves:
the graph; only the record in graph.meta["fusions"] is added.
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.fusion import find, linear, only_user, record
from kiln.passes.patterns import Op, Var

PATTERN = Op("Add", linear("linear"), Var("other"), name="add")


@register("fuse_residual_add")
def fuse_residual_add(graph: Graph, *, enabled: bool = False) -> Graph:
    if not enabled:
        return graph

    def build(m, b):
        lin, add = b["linear"], b["add"]
        return (lin, add) if only_user(m, lin.outputs[0], add) else None

    return record(graph, "residual_add", find(graph, PATTERN, ["Add"], build))
