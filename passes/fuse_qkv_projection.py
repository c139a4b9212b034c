"""Group the q/k/v projection with the Split of a `qkv_rope` group (`qkv_projection`): in
decode, the projection's GEMV (with its `norm_linear` prologue) computes, rotates and appends
in the same kernel, so q/k/v never reach memory apart from the cache.

Group: (linear, Split). Requires: fuse_qkv_rope run first (its groups are read here).
Preserves: the graph; only the record in graph.meta["fusions"] is added. The lowering takes it
where the kernel applies (decode, norm fused, rotary over whole heads).
"""

from __future__ import annotations

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.fusion import find, linear, record, recorded
from kiln.passes.patterns import Op

PATTERN = Op("Split", linear("linear"), name="split")


@register("fuse_qkv_projection")
def fuse_qkv_projection(graph: Graph, *, enabled: bool = False) -> Graph:
    if not enabled:
        return graph
    splits = {g[0].name for g in recorded(graph, "qkv_rope")}

    def build(m, b):
        return (b["linear"], b["split"]) if b["split"].name in splits else None

    return record(graph, "qkv_projection", find(graph, PATTERN, ["Split"], build))
