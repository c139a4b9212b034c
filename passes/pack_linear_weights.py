"""Lay linear weights out for the CPU kernels: fp32 [N / block, K, block], quantized `blocked`.

packed[nb, k, lane] = w[nb * block + lane, k]: one SIMD load reads `block` output columns at one
k (see kiln.codegen.kernels.packed_linear). The packed parameter is derived lazily from the
original by `reshape` + `transpose`, so `kiln convert` and synthetic weights derive it too.
Requires: linear recognized. The rewritten nodes carry `packed=block`; an embedding reading the
same (tied) table is marked too and gathers from the packed layout, so the weights stay one copy.
A weight whose N is not a multiple of `block`, or that has other readers, stays as it is.
quant_linear / quant_embedding weights in the `nk` layout (quantize_weights' or imported) are
laid out `blocked` (kiln.passes.quantize's docstring; one copy shared by all readers); that layout
is still interpreted, the fp32 packing is for code generation only. `block` 0 (the default):
nothing changes.
"""

from __future__ import annotations

import dataclasses

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Attrs, Derived, Graph, Node, Param, ParamSource, TensorType
from kiln.passes import register

#: (op, input slot) pairs that can read a packed weight
_READERS = {("linear", 1), ("embedding", 0)}


@register("pack_linear_weights")
def pack_linear_weights(graph: Graph, *, block: int = 0) -> Graph:
    if not block:
        return graph
    graph = _to_blocked(graph, block)
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


#: input slots of the quantized tensors per op: (qweight, scales, zero_points)
_QUANT_SLOTS = {"quant_linear": (1, 2, 3), "quant_embedding": (0, 1, 2)}


def _to_blocked(graph: Graph, block: int) -> Graph:
    """Lay out every `nk` quantized weight `blocked` (one copy, shared by all its readers)."""
    params, types = dict(graph.params), dict(graph.types)
    renamed: dict[str, str] = {}
    nodes = []
    for n in graph.nodes:
        if n.op not in _QUANT_SLOTS or n.attrs.get("layout") != "nk":
            nodes.append(n)
            continue
        inputs = list(n.inputs)
        for slot in _QUANT_SLOTS[n.op]:
            v = inputs[slot] if slot < len(inputs) else ""
            if not v:
                continue
            if v not in graph.params:
                raise KilnError(f"node {n.name} ({n.op}): quantized input {v} is not a "
                                "parameter")
            if v not in renamed:
                renamed[v] = _blocked_param(params, types, graph.params[v], block)
            inputs[slot] = renamed[v]
        nodes.append(dataclasses.replace(n, inputs=tuple(inputs),
                                         attrs=n.attrs.updated(layout="blocked")))
    for v in renamed:
        del params[v], types[v]
    return graph.replace(nodes=tuple(nodes), params=params, types=types)


def _blocked_param(params: dict, types: dict, p: Param, block: int) -> str:
    rows, cols = p.type.shape
    t = TensorType(p.type.dtype, (-(-rows // block), cols, block))
    src: ParamSource = Derived("quant_blocked", (p.source,), Attrs({"block": block}))
    q = Param(f"{p.name}.blocked{block}", t, src)
    params[q.name], types[q.name] = q, t
    return q.name
