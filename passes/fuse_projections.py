"""Fuse projections that read the same input (q/k/v, gate/up) into one linear and a Split.

One GEMV over the concatenated weight streams the same bytes as several, with one launch and
one pass over the input instead of several. Requires: linear recognized. Preserves: every value
(the Split outputs keep the original linear outputs' names). The fused weight is derived lazily
by concatenating the [N_i, K] weights along N. Fusion `projections` (kiln.passes.fusion):
each fused (linear, Split) is recorded as a group; with `enabled` False nothing changes.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.ir import Attrs, Derived, Graph, Param, TensorType, inline_param
from kiln.passes import register
from kiln.passes.fusion import record
from kiln.passes.rewrite import GraphEditor


@register("fuse_projections")
def fuse_projections(graph: Graph, *, enabled: bool = True) -> Graph:
    if not enabled:
        return graph
    groups: dict[tuple, list] = {}
    for index, n in enumerate(graph.nodes):
        if n.op == "linear" and n.inputs[1] in graph.params:
            w = graph.params[n.inputs[1]].type
            has_bias = len(n.inputs) > 2 and bool(n.inputs[2])
            if has_bias and n.inputs[2] not in graph.params:
                continue
            groups.setdefault((n.inputs[0], w.dtype, w.shape[1], has_bias), []).append(
                (index, n))
    ed, fused = GraphEditor(graph), []
    for (x, _, _, has_bias), members in groups.items():
        if len(members) < 2:
            continue
        fused.append(_fuse(ed, x, [n for _, n in members], first=members[0][0],
                           has_bias=has_bias))
    out = ed.finish()
    prod = out.producers()
    return record(out, "projections", [(prod[y].name, prod[part].name) for y, part in fused])


def _fuse(ed: GraphEditor, x: str, nodes, *, first: int, has_bias: bool) -> tuple[str, str]:
    """Emit the fused linear and its Split; returns (its output, the Split's first output)."""
    ws = [ed.params[n.inputs[1]] for n in nodes]
    sizes = [w.type.shape[0] for w in ws]
    name = "+".join(n.name for n in nodes)
    w = ed.add_param(_concat(f"{name}.weight", ws))
    inputs = [x, w]
    if has_bias:
        inputs.append(ed.add_param(_concat(f"{name}.bias", [ed.params[n.inputs[2]]
                                                             for n in nodes])))
    ed.at(first)
    fused = ed.emit("linear", inputs, name=name)[0]
    split = ed.add_param(inline_param(f"{name}.split", np.array(sizes, np.int64)))
    ed.emit("Split", [fused, split], {"axis": -1}, name=f"{name}.split",
            outputs=[n.outputs[0] for n in nodes],
            types=[ed.types[n.outputs[0]] for n in nodes])
    ed.remove(nodes)
    return fused, nodes[0].outputs[0]


def _concat(name: str, params: list[Param]) -> Param:
    t = params[0].type
    rows = sum(p.type.shape[0] for p in params)
    return Param(name, TensorType(t.dtype, (rows, *t.shape[1:])),
                 Derived("concat", tuple(p.source for p in params), Attrs({"axis": 0})))
