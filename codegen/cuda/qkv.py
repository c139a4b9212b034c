"""The q/k/v pattern of a decoder layer that the CUDA lowering fuses: a Split of one projection
into q, k and v, rotary on q and k, attention over the three (kiln.codegen.cuda.lower_attention
lowers it as one kernel: rotary + KV append, or in decode the projection too)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.compiler.ir import Node


@dataclass(frozen=True, slots=True)
class QkvPattern:
    """split(qkv) -> rotary(q), rotary(k) -> attention(q, k, v)."""

    split: Node
    rot_q: Node
    rot_k: Node


def find_qkv_patterns(graph) -> dict[str, QkvPattern]:
    """attention node name -> its fusable split/rotary producers (see QkvPattern)."""
    prod, users = graph.producers(), graph.consumers()
    outs = set(graph.outputs)

    def only_user(value: str, node: Node) -> bool:
        return value not in outs and [u.name for u in users.get(value, [])] == [node.name]

    found = {}
    for a in (n for n in graph.nodes if n.op == "attention"):
        q, k, v = a.inputs[:3]
        rq, rk, sp = prod.get(q), prod.get(k), prod.get(v)
        if not (rq and rk and sp and rq.op == rk.op == "rotary" and sp.op == "Split"
                and len(sp.outputs) == 3 and sp.outputs[2] == v
                and rq.inputs[0] == sp.outputs[0] and rk.inputs[0] == sp.outputs[1]
                and rq.inputs[1:3] == rk.inputs[1:3]
                and bool(rq.attrs.get("interleaved", False)) ==
                bool(rk.attrs.get("interleaved", False))
                and int(rq.attrs["num_heads"]) == int(a.attrs["num_heads"])
                and int(rk.attrs["num_heads"]) == int(a.attrs["num_kv_heads"])
                and int(rq.attrs["head_dim"]) == int(rk.attrs["head_dim"]) ==
                int(a.attrs["head_dim"])):
            continue
        if all(only_user(x, n) for x, n in ((sp.outputs[0], rq), (sp.outputs[1], rk),
                                            (v, a), (q, a), (k, a))):
            found[a.name] = QkvPattern(sp, rq, rk)
    return found
