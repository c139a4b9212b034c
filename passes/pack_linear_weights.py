"""Pack linear weights [N, K] into the CPU kernels' layout [N / block, K, block] (codegen only).

packed[nb, k, lane] = w[nb * block + lane, k]: one SIMD load reads `block` output columns at one
k (see kiln.codegen.kernels.packed_linear). The packed parameter is derived lazily from the
original by `reshape` + `transpose`, so `kiln convert` and synthetic weights derive it too.
Requires: linear recognized. The rewritten nodes carry `packed=block`; an embedding reading the
same (tied) table is marked too and gathers from the packed layout, so the weights stay one copy.
A weight whose N is not a multiple of `block`, or that has other readers, stays as it is.
The result is for code generation: the interpreter and shape rules know only unpacked weights.
"""

from __future__ import annotations

import dataclasses

from kiln.compiler.ir import Attrs, Derived, Graph, Node, Param, TensorType
from kiln.passes import register

#: (op, input slot) pairs that can read a packed weight
_READERS = {("linear", 1), ("embedding", 0)}


@register("pack_linear_weights")
def pack_linear_weights(graph: Graph, *, block: int = 16) -> Graph:
    uses: dict[str, set[tuple[str, int]]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.params:
                uses.setdefault(v, set()).add((n.op, i))
    chosen = {name for name, u in uses.items()
              if ("linear", 1) in u and u <= _READERS and _packable(graph.params[name], block)}
    if not chosen:
        return graph
    params, types = dict(graph.params), dict(graph.types)
    renamed = {}
    for name in chosen:
        p = _packed(graph.params[name], block)
        params[p.name], types[p.name] = p, p.type
        renamed[name] = p.name
    nodes = tuple(_rewire(n, renamed, block) for n in graph.nodes)
    for name in chosen:
        del params[name]
        del types[name]
    return graph.replace(nodes=nodes, params=params, types=types)


def _packable(p: Param, block: int) -> bool:
    shape = p.type.shape or ()
    return len(shape) == 2 and isinstance(shape[0], int) and shape[0] % block == 0


def _packed(p: Param, block: int) -> Param:
    n, k = p.type.shape
    split = Derived("reshape", (p.source,), Attrs({"shape": (n // block, block, k)}))
    src = Derived("transpose", (split,), Attrs({"perm": (0, 2, 1)}))
    return Param(f"{p.name}.packed{block}", TensorType(p.type.dtype, (n // block, k, block)),
                 src)


def _rewire(n: Node, renamed: dict[str, str], block: int) -> Node:
    slot = {"linear": 1, "embedding": 0}.get(n.op)
    if slot is None or slot >= len(n.inputs) or n.inputs[slot] not in renamed:
        return n
    inputs = list(n.inputs)
    inputs[slot] = renamed[n.inputs[slot]]
    return dataclasses.replace(n, inputs=tuple(inputs), attrs=Attrs({**n.attrs, "packed": block}))
