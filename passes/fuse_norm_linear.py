"""Group an rms_norm with the one bias-free linear reading it (`norm_linear`): the norm becomes
the prologue of that linear's decode GEMV (x read once, normalized in registers).

Group: (rms_norm, linear). Requires: norms and linears recognized (quantized or sparse linears
too). Preserves: the graph; only the record in graph.meta["fusions"] is added. A per-head
(group_size) norm, a norm that is a graph output or read by anything else is not grouped.
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.fusion import LINEARS, bias_of, find, linear, only_user, record
from kiln.passes.patterns import Op

NORM = Op("rms_norm", name="norm", where=lambda m, n: not n.attrs.get("group_size"))
PATTERN = linear("linear", NORM, where=lambda m, n: not bias_of(n))


@register("fuse_norm_linear")
def fuse_norm_linear(graph: Graph, *, enabled: bool = False) -> Graph:
    if not enabled:
        return graph

    def build(m, b):
        norm, lin = b["norm"], b["linear"]
        return (norm, lin) if only_user(m, norm.outputs[0], lin) else None

    return record(graph, "norm_linear", find(graph, PATTERN, LINEARS, build))
