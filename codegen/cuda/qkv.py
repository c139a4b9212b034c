"""The q/k/v region of a decoder layer that the CUDA lowering fuses (a `qkv_rope` group,
kiln.passes.fuse_qkv_rope): a Split of one projection into q, k and v, rotary on q and k,
attention over the three (kiln.codegen.cuda.lower_attention lowers it as one kernel: rotary +
KV append, or in decode the projection too)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.compiler.ir import Graph, Node
from kiln.passes.fusion import recorded


@dataclass(frozen=True, slots=True)
class QkvPattern:
    """split(qkv) -> rotary(q), rotary(k) -> attention(q, k, v)."""

    split: Node
    rot_q: Node
    rot_k: Node


def fused_groups(graph: Graph) -> list[tuple[Node, ...]]:
    """The recorded `qkv_rope` groups (split, rotary q, rotary k, attention) the fused kernels
    take: those whose attention keeps a cache of the compute dtype. An int8 KV cache (kv_bits 8)
    is written by its quantizing append, after the rotary's own kernel."""
    return [grp for grp in recorded(graph, "qkv_rope")
            if int(grp[-1].attrs.get("kv_bits", 0)) != 8]
