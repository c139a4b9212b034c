"""Type rules for the canonical transformer ops (layouts: compiler/interpreter/transformer_ops)."""

from __future__ import annotations

import sympy

from kiln.compiler.ir import DType, TensorType
from kiln.compiler.shapes import broadcast, dims_equal, fail, rule
from kiln.runtime import quant_format as qf


def _same(node, types, values):
    return [types[0]]


rule("layer_norm", "gelu", "silu", "silu_mul", "gelu_mul", "all_reduce")(_same)


@rule("all_gather")
def all_gather(node, types, values):
    """Every shard's operand concatenated along `axis`: that dim times the shards."""
    x = types[0]
    if x.shape is None:
        return [x]
    shape = list(x.shape)
    axis = int(node.attrs.get("axis", -1)) % len(shape)
    shape[axis] = shape[axis] * int(node.attrs["shards"])
    return [TensorType(x.dtype, tuple(shape))]


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


def _unpacked(node, w: TensorType) -> TensorType:
    """A weight pack_linear_weights laid out [N / B, K, B] (attr `packed` = B) as its [N, K]."""
    block = node.attrs.get("packed")
    if not block or w.shape is None:
        return w
    if len(w.shape) != 3 or w.shape[2] != block:
        raise fail(node, f"a packed weight is [N / {block}, K, {block}]", w)
    return TensorType(w.dtype, (w.shape[0] * block, w.shape[1]))


@rule("linear")
def linear(node, types, values):
    x, w = types[0], _unpacked(node, types[1])
    if x.shape is not None and w.shape is not None:
        if len(w.shape) != 2 or dims_equal(x.shape[-1], w.shape[1]) is False:
            raise fail(node, "input features do not match the weight's [N, K]", x, w)
        return [TensorType(x.dtype, (*x.shape[:-1], w.shape[0]))]
    return [TensorType(x.dtype, None)]


@rule("embedding")
def embedding(node, types, values):
    table, ids = _unpacked(node, types[0]), types[1]
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


def _quant_weight_shapes(node) -> tuple[tuple, tuple]:
    """The (qweight, scales) shapes quant_linear/quant_embedding attributes imply."""
    a = node.attrs
    bits, g, k, n = (int(a[x]) for x in ("bits", "group_size", "in_features", "out_features"))
    if bits not in (4, 8) or g < 1 or (bits == 4 and g % 2):
        raise fail(node, f"bad quantization bits={bits} group_size={g}")
    groups = qf.groups_of(k, g)[1]
    cols = qf.packed_columns(qf.padded_k(k, g), bits)
    if a.get("layout", "nk") == "blocked":
        return None, (groups,)  # block count and lanes are checked against each other below
    return (n, cols), (n, groups)


@rule("quant_linear", "quant_embedding")
def quant_linear(node, types, values):
    a = node.attrs
    k, n = int(a["in_features"]), int(a["out_features"])
    q_slot = 1 if node.op == "quant_linear" else 0
    qt, st = types[q_slot], types[q_slot + 1]
    q_shape, s_shape = _quant_weight_shapes(node)
    if q_shape is not None and (qt.shape != q_shape or st.shape != s_shape):
        raise fail(node, f"nk layout expects qweight {list(q_shape)} and scales "
                   f"{list(s_shape)}", qt, st)
    if q_shape is None and (len(qt.shape or ()) != 3 or len(st.shape or ()) != 3
                            or qt.shape[0] * qt.shape[2] < n or st.shape[1] != s_shape[0]):
        raise fail(node, f"blocked layout does not hold {n} x {k} weights", qt, st)
    if node.op == "quant_embedding":
        ids = types[3]
        if not ids.dtype.is_int:
            raise fail(node, "ids must be integers", ids)
        return [TensorType(DType.f32, None if ids.shape is None else (*ids.shape, k))]
    x = types[0]
    if x.shape is None:
        return [TensorType(x.dtype, None)]
    if dims_equal(x.shape[-1], k) is False:
        raise fail(node, f"input features do not match in_features {k}", x, qt)
    return [TensorType(x.dtype, (*x.shape[:-1], n))]


@rule("sparse_linear")
def sparse_linear(node, types, values):
    from kiln.runtime.sparse_format import BLOCK

    a = node.attrs
    x, vt, mt = types[:3]
    st = types[3] if len(types) > 3 else None
    layout, k, n = a.get("layout"), int(a["in_features"]), int(a["out_features"])
    if layout == "nm":
        want_v, want_m, meta_dtype = (n, k // 2), (n, -(-k // 8)), DType.u8
        if k % 4:
            raise fail(node, f"2:4 layout needs in_features % 4 == 0, got {k}")
    elif layout == "bitmap":
        if n % BLOCK:
            raise fail(node, f"bitmap layout needs out_features % {BLOCK} == 0, got {n}")
        cap = vt.shape[1] if vt.shape is not None and len(vt.shape) == 2 else None
        want_v, want_m, meta_dtype = (n // BLOCK, cap), (n // BLOCK, k), DType.u16
    else:
        raise fail(node, f"unknown sparse layout {layout!r}")
    if vt.shape != want_v or mt.shape != want_m or mt.dtype is not meta_dtype:
        raise fail(node, f"{layout} layout of a {n} x {k} weight expects values {list(want_v)} "
                   f"and meta {meta_dtype.value}{list(want_m)}", vt, mt)
    if vt.dtype.is_int and (st is None or st.shape != (n,)):
        raise fail(node, f"integer values need float32 scales[{n}]", vt, st)
    if x.shape is None:
        return [TensorType(x.dtype, None)]
    if dims_equal(x.shape[-1], k) is False:
        raise fail(node, f"input features do not match in_features {k}", x, vt)
    return [TensorType(DType.f32 if vt.dtype.is_int else x.dtype, (*x.shape[:-1], n))]
