"""Group the q/k/v Split, the rotary of q and of k and the attention reading them (`qkv_rope`):
one kernel splits, rotates and appends k and v to the KV cache in place before attention.

Group: (Split, rotary q, rotary k, attention). Requires: attention and rotary recognized,
fuse_projections (q/k/v as one linear + Split). Preserves: the graph; only the record in
graph.meta["fusions"] is added. Both rotaries share cos/sin and interleaving; heads and head
dim agree with the attention's; q, k, v and the split outputs are read by their consumer alone.
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.fusion import find, only_user, record
from kiln.passes.patterns import Op, Var


def _part(i: int) -> Op:
    return Op("Split", Var("qkv"), out=i, name="split", where=lambda m, n: len(n.outputs) == 3)


def _rotary(i: int, name: str) -> Op:
    return Op("rotary", _part(i), Var("cos"), Var("sin"), name=name)


PATTERN = Op("attention", _rotary(0, "rot_q"), _rotary(1, "rot_k"), _part(2), name="attention")


def _heads_agree(rq, rk, a) -> bool:
    def ints(node, key: str) -> int:
        return int(node.attrs[key])

    return (bool(rq.attrs.get("interleaved", False)) == bool(rk.attrs.get("interleaved", False))
            and ints(rq, "num_heads") == ints(a, "num_heads")
            and ints(rk, "num_heads") == ints(a, "num_kv_heads")
            and ints(rq, "head_dim") == ints(rk, "head_dim") == ints(a, "head_dim"))


@register("fuse_qkv_rope")
def fuse_qkv_rope(graph: Graph, *, enabled: bool = False) -> Graph:
    if not enabled:
        return graph

    def build(m, b):
        sp, rq, rk, a = b["split"], b["rot_q"], b["rot_k"], b["attention"]
        q, k, v = a.inputs[:3]
        alone = all(only_user(m, x, n) for x, n in ((sp.outputs[0], rq), (sp.outputs[1], rk),
                                                    (v, a), (q, a), (k, a)))
        return (sp, rq, rk, a) if alone and _heads_agree(rq, rk, a) else None

    return record(graph, "qkv_rope", find(graph, PATTERN, ["attention"], build))
