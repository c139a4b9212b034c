"""Node ordering for imported graphs: SSA checks, stable topological sort, cycle reports."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node


def check_ssa(nodes: Sequence[Node], defined: Iterable[str]) -> None:
    """Every value is defined once: by a graph input, a parameter or one node output."""
    owner = {v: "a graph input or initializer" for v in defined}
    for n in nodes:
        for v in n.outputs:
            if not v:
                continue
            if v in owner:
                raise KilnError(f"node {n.name} ({n.op}) redefines {v}, already defined by "
                                f"{owner[v]}")
            owner[v] = f"node {n.name}"


def toposort(nodes: Sequence[Node], defined: Iterable[str]) -> list[Node]:
    """Nodes in dependency order, keeping the file's order where it is already valid.

    Raises a KilnError naming the node and value for a dangling input, and a node on the
    cycle for a cyclic graph.
    """
    available = set(defined)
    producer = {v: i for i, n in enumerate(nodes) for v in n.outputs if v}
    waiting: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        deps = set()
        for v in n.inputs:
            if not v or v in available:
                continue
            if v not in producer:
                raise KilnError(f"node {n.name} ({n.op}) reads {v}, which nothing defines "
                                "(dangling input)")
            deps.add(producer[v])
        waiting[i] = len(deps)
        for d in deps:
            readers.setdefault(d, []).append(i)
    return _kahn(nodes, waiting, readers, producer)


def _kahn(nodes: Sequence[Node], waiting: dict[int, int], readers: dict[int, list[int]],
          producer: dict[str, int]) -> list[Node]:
    import heapq

    ready = [i for i, k in waiting.items() if k == 0]
    heapq.heapify(ready)  # smallest index first: a sorted file keeps its order
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for r in readers.get(i, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    if len(order) < len(nodes):
        stuck = next(i for i, k in waiting.items() if k > 0)
        n = nodes[_on_cycle(nodes, stuck, waiting, producer)]
        raise KilnError(f"the graph has a cycle through node {n.name} ({n.op})")
    return [nodes[i] for i in order]


def _on_cycle(nodes: Sequence[Node], start: int, waiting: dict[int, int],
              producer: dict[str, int]) -> int:
    """Walk back along unresolved inputs from a stuck node until a node repeats."""
    seen: set[int] = set()
    i = start
    while i not in seen:
        seen.add(i)
        i = next(producer[v] for v in nodes[i].inputs
                 if v in producer and waiting[producer[v]] > 0)
    return i
