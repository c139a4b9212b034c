"""Type rules for the canonical transformer ops (layouts: compiler/interpreter/transformer_ops)."""

from __future__ import annotations

import sympy

from kiln.compiler.ir import TensorType
from kiln.compiler.shapes import broadcast, dims_equal, fail, rule


def _same(node, types, values):
    return [types[0]]


rule("layer_norm", "gelu", "silu", "silu_mul", "gelu_mul")(_same)


@rule("rms_norm")
def rms_norm(node, types, values):
    x, w = types[0], types[1]
    group = node.attrs.get("group_size")
    features = group if group is not None else (x.shape[-1] if x.shape else None)
    if x.shape is not None and group is not None and (
            not isinstance(x.shape[-1], int) or x.shape[-1] % group):
        raise fail(node, f"last dim is not a multiple of group_size {group}", x)
    if w.shape and features is not None and dims_equal(w.shape[-1], features) is False:
        raise fail(node, "weight does not match the normalized features", x, w)
    return [x]


@rule("linear")
def linear(node, types, values):
    x, w = types[0], types[1]
    if x.shape is not None and w.shape is not None:
        if len(w.shape) != 2 or dims_equal(x.shape[-1], w.shape[1]) is False:
            raise fail(node, "input features do not match the weight's [N, K]", x, w)
        return [TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))]
    return [TensorType(x.dtype, None)]


@rule("embedding")
def embedding(node, types, values):
    table, ids = types
    if not ids.dtype.is_int:
        raise fail(node, "ids must be integers", table, ids)
    if table.shape is None or ids.shape is None:
        return [TensorType(table.dtype, None)]
    return [TensorType(table.dtype, (*ids.shape, table.shape[-1]))]


@rule("rotary")
def rotary(node, types, values):
    x, cos, _sin = types
    h, d = node.attrs["num_heads"], node.attrs["head_dim"]
    if x.shape is not None and dims_equal(x.shape[-1], h * d) is False:
        raise fail(node, f"last dim must be num_heads*head_dim = {h * d}", x)
    if cos.shape is not None and isinstance(cos.shape[-1], int) and cos.shape[-1] > d:
        raise fail(node, f"rotary dim exceeds head_dim {d}", x, cos)
    return [x]


@rule("attention")
def attention(node, types, values):
    q, k, v = types[:3]
    past_k = types[3] if len(types) > 3 else None
    h, kvh, d = (node.attrs[a] for a in ("num_heads", "num_kv_heads", "head_dim"))
    if h % kvh:
        raise fail(node, f"num_heads {h} is not a multiple of num_kv_heads {kvh}")
    for t, heads in ((q, h), (k, kvh), (v, kvh)):
        if t.shape is not None and dims_equal(t.shape[-1], heads * d) is False:
            raise fail(node, f"expected last dim {heads}*{d}", q, k, v)
    b, s = (q.shape[0], q.shape[1]) if q.shape is not None else (sympy.Symbol("b"),
                                                                  sympy.Symbol("s"))
    if past_k is not None and past_k.shape is not None:
        total = past_k.shape[2] + s
        broadcast(node, past_k.shape, (b, kvh, past_k.shape[2], d))
    else:
        total = s
    present = TensorType(k.dtype, (b, kvh, total, d))
    return [TensorType(q.dtype, q.shape), present, present]
