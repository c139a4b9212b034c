"""Group a gate/up projection, the Split of its output in halves and the silu_mul over them
(`swiglu`): SwiGLU becomes the epilogue of the projection's kernel, the [.., 2F] product is
never written.

Group: (linear, Split, silu_mul). Requires: fuse_projections (gate/up as one linear + Split),
activations recognized. Preserves: the graph; only the record in graph.meta["fusions"] is added.
The Split must be read by the silu_mul alone, as (gate, up) in that order; the split sizes are
the lowering's to check (halves).
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.fusion import find, linear, record
from kiln.passes.patterns import Op

_LIN = linear("linear")


def _half(i: int) -> Op:
    return Op("Split", _LIN, out=i, name="split", where=lambda m, n: len(n.outputs) == 2)


PATTERN = Op("silu_mul", _half(0), _half(1), name="silu_mul")


@register("fuse_swiglu")
def fuse_swiglu(graph: Graph, *, enabled: bool = False) -> Graph:
    if not enabled:
        return graph

    def build(m, b):
        lin, sp, u = b["linear"], b["split"], b["silu_mul"]
        alone = (len(m.users(lin.outputs[0])) == 1 and u.outputs[0] not in m.graph.outputs
                 and [x.name for x in m.users(sp.outputs[0])] == [u.name]
                 and [x.name for x in m.users(sp.outputs[1])] == [u.name])
        return (lin, sp, u) if alone else None

    return record(graph, "swiglu", find(graph, PATTERN, ["silu_mul"], build))
