"""eliminate_dead_code: drop nodes whose outputs nothing reads, and unused params.

Requires: a graph in topological order. Preserves: graph inputs and outputs (the interface),
and every node and param that an output depends on.
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register


@register("eliminate_dead_code")
def eliminate_dead_code(graph: Graph) -> Graph:
    """Keep only what the graph outputs depend on; types of dropped values go too."""
    live = set(graph.outputs)
    kept = []
    for node in reversed(graph.nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(v for v in node.inputs if v)
    nodes = tuple(reversed(kept))
    params = {k: p for k, p in graph.params.items() if k in live}
    defined = set(graph.inputs) | set(params) | {o for n in nodes for o in n.outputs if o}
    types = {v: t for v, t in graph.types.items() if v in defined}
    return graph.replace(nodes=nodes, params=params, types=types)
