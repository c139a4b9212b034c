"""Store the KV cache as int8 rows with one float32 scale per (batch, head, position) row.

Sets `kv_bits = 8` on every attention node; codegen then allocates int8 cache buffers with scale
companions, quantizes rows as it appends them and dequantizes inside attention, and the numpy
interpreter rounds new rows through the same int8 scheme, so the quantized graph keeps an exact
reference. Quarters the cache's bytes: decode at long contexts reads a quarter of the K/V traffic.
Requires: attention recognized (with past_k/past_v inputs). Preserves: every value except the
attention outputs, which change by the rounding of K and V.
"""

from __future__ import annotations

import dataclasses

from kiln.compiler.ir import Graph
from kiln.passes import register


@register("quantize_kv_cache")
def quantize_kv_cache(graph: Graph, *, bits: int = 0) -> Graph:
    """`bits` 8: an int8 cache; 0 (the default, as a pipeline stage): the cache as it is."""
    if not bits:
        return graph
    if bits != 8:
        from kiln.compiler.errors import KilnError

        raise KilnError(f"quantize_kv_cache: only 8-bit caches are supported, got {bits}")
    nodes = tuple(dataclasses.replace(n, attrs=n.attrs.updated(kv_bits=bits))
                  if n.op == "attention" else n for n in graph.nodes)
    return graph.replace(nodes=nodes)
