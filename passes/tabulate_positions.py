"""Replace per-position tables computed at run time (rotary cos/sin) by a lookup into a table
precomputed for every position of the context.

Exporters compute cos/sin from position_ids with a few generic ops (inv_freq outer product,
concat, Cos, Sin, scaling); whatever the scheme (plain, linear-scaled, Llama 3, YaRN), the result
is a function of each position alone. That is established by evaluation, not by pattern: the
subgraph that reads only position_ids is run for positions 0..N-1 and then on random position
ids, which must give exactly the rows of that table. It then becomes embedding(table, position_ids).
Exports without a position_ids input (Gemma's, by optimum) compute positions as
Range(past, past + seq); that Range output is then the source of the lookup instead.

Requires: the canonicalize pipeline. Option: `max_positions` (the compiled context, N).
Preserves: every value's type and meaning for positions < N.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.interpreter import run
from kiln.compiler.ir import PAST, SEQ, Graph, inline_param
from kiln.passes import register
from kiln.passes.rewrite import GraphEditor

POSITIONS = "position_ids"


@register("tabulate_positions")
def tabulate_positions(graph: Graph, *, max_positions: int = 2048) -> Graph:
    source = _position_source(graph)
    if source is None:
        return graph
    producer = graph.producers()
    cone = _pure_values(graph, source)
    ed = GraphEditor(graph)
    for v in _frontier(graph, cone, source):
        if producer[v].op == "embedding" and producer[v].inputs[1] == source:
            continue  # already a lookup (learned positions)
        table = _table(graph, cone, source, v, max_positions)
        if table is None:
            continue
        name = ed.add_param(inline_param(f"{v}.table", table))
        ed.at(graph.nodes.index(producer[v]))
        shape = graph.types[v].shape
        if len(shape) == len(graph.types[source].shape) + 1:
            ed.emit("embedding", [name, source], name=f"{v}.lookup", outputs=[v])
        else:  # leading unit dims (Range positions): look up, then restore the value's shape
            (rows,) = ed.emit("embedding", [name, source], name=f"{v}.lookup")
            ed.emit("Reshape", [rows], {"shape": tuple(shape)}, name=f"{v}.view", outputs=[v])
        ed.remove([producer[v]])
    return ed.finish()


def _position_source(graph: Graph) -> str | None:
    """position_ids, or the output of a Range(past, past + seq) (the cache positions)."""
    if POSITIONS in graph.inputs:
        return POSITIONS
    for n in graph.nodes:
        a = n.attrs
        if n.op == "Range" and not any(n.inputs) and str(a.get("start")) == PAST and \
                str(a.get("delta")) == "1" and \
                str(a.get("limit")) in (f"{PAST} + {SEQ}", f"{SEQ} + {PAST}"):
            return n.outputs[0]
    return None


def _pure_values(graph: Graph, source: str) -> set[str]:
    """Values computed from the positions and constants alone (constants broadcast to a symbolic
    shape included: the table check below decides whether a value really is per-position)."""
    pure = {source}
    for n in graph.nodes:
        ins = [i for i in n.inputs if i]
        if ins and all(i in pure or i in graph.params for i in ins):
            pure.update(o for o in n.outputs if o)
    return pure


def _frontier(graph: Graph, pure: set[str], source: str) -> list[str]:
    """Pure float values read by something impure: the tables the model actually uses."""
    out = []
    for n in graph.nodes:
        if any(o in pure for o in n.outputs):
            continue
        for i in n.inputs:
            if i in pure and i != source and i not in out and graph.types[i].dtype.is_float:
                out.append(i)
    return out


def _table(graph: Graph, pure: set[str], source: str, value: str, n: int) -> np.ndarray | None:
    t, pos = graph.types[value], graph.types[source]
    if t.shape is None or pos.shape is None or not isinstance(t.shape[-1], int):
        return None
    lead = len(t.shape) - 1 - len(pos.shape)  # unit dims before the positions' own
    if lead < 0 or any(d != 1 for d in t.shape[:lead]):
        return None
    width = t.shape[-1]
    sub = graph.replace(nodes=tuple(x for x in graph.nodes if any(o in pure for o in x.outputs)
                                    and source not in x.outputs),
                        inputs=(source,), outputs=(value,))
    positions = np.arange(n, dtype=np.int64).reshape((1,) * (len(pos.shape) - 1) + (n,))
    probe = np.random.default_rng(0).integers(0, n, (2, 5)[-len(pos.shape):]).astype(np.int64)
    try:
        table = run(sub, {source: positions})[value].reshape(n, width)
        got = run(sub, {source: probe})[value]
    except Exception:
        return None
    if got.size != probe.size * width or not np.array_equal(
            got.reshape(*probe.shape, width), table[probe]):
        return None
    return np.ascontiguousarray(table.astype(t.dtype.numpy))
