"""eliminate_common_subexpressions: merge equal params and nodes that compute the same thing.

Requires: a graph in topological order. Preserves: graph inputs and outputs (a node defining a
graph output is never merged away). Params merge when their data is small and identical, or
when they come from the same (non-inline) source with the same type.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np

from kiln.compiler.ir import Graph, Inline, Node, Param
from kiln.passes import register

#: params up to this many bytes are compared by content
MAX_COMPARED_BYTES = 1 << 16

#: ops whose repeated calls give different results
_NONDETERMINISTIC = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                               "RandomUniformLike", "Multinomial", "Bernoulli"})


@register("eliminate_common_subexpressions")
def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Merge duplicate params, then nodes with the same op, attributes and (merged) inputs."""
    rename = _merge_params(graph.params)
    keep = set(graph.outputs)
    seen: dict[Hashable, Node] = {}
    nodes = []
    for node in graph.nodes:
        node = Node(node.op, tuple(rename.get(v, v) for v in node.inputs), node.outputs,
                    node.attrs, node.name)
        key = (node.op, node.attrs, node.inputs, len(node.outputs))
        first = seen.get(key)
        if first is not None and not keep.intersection(node.outputs):
            rename.update(zip(node.outputs, first.outputs, strict=True))
            continue
        if node.op not in _NONDETERMINISTIC:
            seen.setdefault(key, node)
        nodes.append(node)
    params = {k: p for k, p in graph.params.items() if k not in rename}
    gone = set(rename)
    types = {v: t for v, t in graph.types.items() if v not in gone or v in keep}
    return graph.replace(nodes=tuple(nodes), params=params, types=types)


def _merge_params(params: Mapping[str, Param]) -> dict[str, str]:
    """Duplicate param name -> the first param with the same contents."""
    first: dict[Hashable, str] = {}
    rename: dict[str, str] = {}
    for name, p in params.items():
        key = _param_key(p)
        if key is None:
            continue
        if key in first:
            rename[name] = first[key]
        else:
            first[key] = name
    return rename


def _param_key(p: Param) -> Hashable | None:
    if p.type.shape is None:
        return None
    if not isinstance(p.source, Inline):  # same file region or same derivation
        key = ("source", p.type, p.source)
        try:
            hash(key)
        except TypeError:  # a source holding unhashable data: compare nothing
            return None
        return key
    if p.nbytes > MAX_COMPARED_BYTES:
        return None
    arr = np.ascontiguousarray(p.load())
    return ("data", p.type, arr.tobytes())
