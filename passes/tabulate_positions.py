"""Replace per-position tables computed at run time (rotary cos/sin) by a lookup into a table
precomputed for every position of the context.

Exporters compute cos/sin from position_ids with a few generic ops (inv_freq outer product,
concat, Cos, Sin, scaling); whatever the scheme (plain, linear-scaled, Llama 3, YaRN), the result
is a function of each position alone. That is established by evaluation, not by pattern: the
subgraph that reads only position_ids is run for positions 0..N-1 and then on random position
ids, which must give exactly the rows of that table. It then becomes embedding(table, position_ids).

Requires: the canonicalize pipeline. Option: `max_positions` (the compiled context, N).
Preserves: every value's type and meaning for positions < N.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.interpreter import run
from kiln.compiler.ir import Graph, inline_param
from kiln.passes import register
from kiln.passes.rewrite import GraphEditor

POSITIONS = "position_ids"


@register("tabulate_positions")
def tabulate_positions(graph: Graph, *, max_positions: int = 2048) -> Graph:
    if POSITIONS not in graph.inputs:
        return graph
    producer = graph.producers()
    cone = _pure_position_values(graph)
    ed = GraphEditor(graph)
    for v in _frontier(graph, cone):
        if producer[v].op == "embedding" and producer[v].inputs[1] == POSITIONS:
            continue  # already a lookup (learned positions)
        table = _table(graph, cone, producer, v, max_positions)
        if table is None:
            continue
        name = ed.add_param(inline_param(f"{v}.table", table))
        ed.at(graph.nodes.index(producer[v]))
        ed.emit("embedding", [name, POSITIONS], name=f"{v}.lookup", outputs=[v])
        ed.remove([producer[v]])
    return ed.finish()


def _pure_position_values(graph: Graph) -> set[str]:
    """Values computed from position_ids and constants alone (constants broadcast to a symbolic
    shape included: the table check below decides whether a value really is per-position)."""
    pure = {POSITIONS}
    for n in graph.nodes:
        ins = [i for i in n.inputs if i]
        if all(i in pure or i in graph.params for i in ins):
            pure.update(o for o in n.outputs if o)
    return pure


def _frontier(graph: Graph, pure: set[str]) -> list[str]:
    """Pure float values read by something impure: the tables the model actually uses."""
    out = []
    for n in graph.nodes:
        if any(o in pure for o in n.outputs):
            continue
        for i in n.inputs:
            if i in pure and i != POSITIONS and i not in out and graph.types[i].dtype.is_float:
                out.append(i)
    return out


def _table(graph: Graph, pure: set[str], producer, value: str, n: int) -> np.ndarray | None:
    t = graph.types[value]
    pos = graph.types[POSITIONS]
    if t.shape is None or pos.shape is None or len(t.shape) != len(pos.shape) + 1 or \
            not isinstance(t.shape[-1], int):
        return None
    sub = graph.replace(nodes=tuple(x for x in graph.nodes if any(o in pure for o in x.outputs)),
                        inputs=(POSITIONS,), outputs=(value,))
    try:
        table = run(sub, {POSITIONS: np.arange(n, dtype=np.int64)[None]})[value][0]
        probe = np.random.default_rng(0).integers(0, n, (2, 5)).astype(np.int64)
        got = run(sub, {POSITIONS: probe})[value]
    except Exception:
        return None
    if table.shape != (n, t.shape[-1]) or not np.array_equal(got, table[probe]):
        return None
    return np.ascontiguousarray(table.astype(t.dtype.numpy))


