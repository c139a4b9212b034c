"""The IR verifier: SSA, use-after-def, declared types, and shapes against inference rules."""

from __future__ import annotations

from kiln.compiler import shapes
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Graph


def verify(graph: Graph, *, check_shapes: bool = True) -> None:
    """Raise KilnError (naming node, op and shapes) at the first violation found."""
    defined: set[str] = set()
    for v in graph.inputs:
        if v in defined:
            raise KilnError(f"graph input {v} is declared twice")
        defined.add(v)
    for p in graph.params:
        if p in defined:
            raise KilnError(f"parameter {p} shadows a graph input")
        defined.add(p)
    for v in (*graph.inputs, *graph.params):
        if v not in graph.types:
            raise KilnError(f"value {v} has no type")
    for node in graph.nodes:
        for v in node.inputs:
            if v and v not in defined:
                raise KilnError(f"node {node.name} ({node.op}) reads {v} before it is defined "
                                "(dangling edge or cycle)")
        for v in node.outputs:
            if not v:
                continue
            if v in defined:
                raise KilnError(f"node {node.name} ({node.op}) redefines {v} (not SSA)")
            if v not in graph.types:
                raise KilnError(f"node {node.name} ({node.op}) output {v} has no type")
            defined.add(v)
        if check_shapes:
            _check_node_types(graph, node)
    for v in graph.outputs:
        if v not in defined:
            raise KilnError(f"graph output {v} is never defined")


def _check_node_types(graph: Graph, node) -> None:
    in_types = [graph.types.get(v) if v else None for v in node.inputs]
    values = [graph.params[v].source.load() if v in graph.params and _small(graph, v) else None
              for v in node.inputs]
    inferred = shapes.infer(node, in_types, values)
    if inferred is None:
        return
    for out, want in zip(node.outputs, inferred, strict=False):
        if not out:
            continue
        have = graph.types[out]
        if not shapes.types_agree(want, have):
            raise KilnError(f"node {node.name} ({node.op}): output {out} is declared {have} "
                            f"but its inputs ({', '.join(str(t) for t in in_types)}) give {want}")


def _small(graph: Graph, v: str) -> bool:
    p = graph.params[v]
    return p.type.dtype.is_int and p.nbytes <= 1024 and p.source.available
