"""The q/k/v region of a decoder layer that the CUDA lowering fuses (a `qkv_rope` group,
kiln.passes.fuse_qkv_rope): a Split of one projection into q, k and v, rotary on q and k,
attention over the three (kiln.codegen.cuda.lower_attention lowers it as one kernel: rotary +
KV append, or in decode the projection too)."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.compiler.ir import Node


@dataclass(frozen=True, slots=True)
class QkvPattern:
    """split(qkv) -> rotary(q), rotary(k) -> attention(q, k, v)."""

    split: Node
    rot_q: Node
    rot_k: Node
