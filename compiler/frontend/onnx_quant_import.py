"""Pre-quantized ONNX weights -> kiln's `quant_linear` (layout "nk"), repacked bit-exactly.

Two forms are recognized on constant weights:
  * com.microsoft.MatMulNBits (onnxruntime's weight-only quantizer): B uint8[N, blocks, blob]
    already holds two 4-bit codes per byte, k = 2j in the low nibble: it is kiln's nk layout
    once reshaped to [N, Kp / 2]; scales reshape to [N, G]; packed uint4 zero points unpack to
    float32 (default 8). 8-bit B becomes int8 by subtracting 128 from codes and zero points.
  * QDQ: DequantizeLinear(int8/uint8 constant W[K, N], scale, zero_point) feeding MatMul's B,
    per tensor, per output channel (axis 1) or blocked along K (block_size, axis 0).
No weight is dequantized and re-quantized: the codes are moved, never rounded again. Everything
is Derived from the initializers, so `kiln convert` regenerates it from the ONNX weights.
"""

from __future__ import annotations

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import PARAM_TRANSFORMS, Attrs, Derived, DType, Node, Param, TensorType
from kiln.runtime import quant_format as qf
from kiln.runtime import transforms

MATMUL_NBITS = "com.microsoft.MatMulNBits"
#: ops this module turns into quant_linear (they need no interpreter kernel of their own)
IMPORTED_OPS = frozenset({MATMUL_NBITS, "DequantizeLinear"})


for _name, _fn in transforms.QUANT_IMPORT.items():
    PARAM_TRANSFORMS.setdefault(_name, _fn)


def import_quantized(nodes: list[Node], params: dict[str, Param],
                     types: dict[str, TensorType]) -> list[Node]:
    """`nodes` with MatMulNBits and QDQ weight MatMuls replaced by quant_linear nodes."""
    readers: dict[str, int] = {}
    for n in nodes:
        for v in n.inputs:
            readers[v] = readers.get(v, 0) + 1
    dq = {n.outputs[0]: n for n in nodes if n.op == "DequantizeLinear" and
          n.inputs[0] in params and readers.get(n.outputs[0], 0) == 1}
    out = []
    for n in nodes:
        if n.op == MATMUL_NBITS:
            out.append(_matmul_nbits(n, params, types))
        elif n.op == "MatMul" and len(n.inputs) == 2 and n.inputs[1] in dq:
            q = _qdq_matmul(n, dq[n.inputs[1]], params, types)
            out.append(q if q is not None else n)
        else:
            out.append(n)
    used = {v for n in out for v in n.inputs}
    return [n for n in out if not (n.op == "DequantizeLinear" and n.outputs[0] in dq
                                   and n.outputs[0] not in used)]


def _add(params: dict, types: dict, name: str, t: TensorType, src) -> str:
    params[name], types[name] = Param(name, t, src), t
    return name


def _const(params: dict, name: str, node: Node, what: str) -> Param:
    if name not in params:
        raise KilnError(f"node {node.name} ({node.op}): {what} {name} must be a constant "
                        "initializer")
    return params[name]


def _matmul_nbits(n: Node, params: dict, types: dict) -> Node:
    a = n.attrs
    k, nn, bits, block = (int(a[x]) for x in ("K", "N", "bits", "block_size"))
    if bits not in (4, 8):
        raise KilnError(f"node {n.name} ({n.op}): bits={bits}; kiln imports 4 and 8")
    if len(n.inputs) > 4 and n.inputs[4]:
        raise KilnError(f"node {n.name} ({n.op}): g_idx (act-order) is not supported")
    b = _const(params, n.inputs[1], n, "B")
    s = _const(params, n.inputs[2], n, "scales")
    if s.type.dtype is not DType.f32:
        raise KilnError(f"node {n.name} ({n.op}): scales are {s.type.dtype.value}; kiln "
                        "imports float32")
    groups = qf.groups_of(k, block)[1]
    cols = qf.packed_columns(qf.padded_k(k, block), bits)  # MatMulNBits' blob is kiln's row
    base = n.inputs[1]
    src = Derived("reshape", (b.source,), Attrs({"shape": (nn, cols)}))
    if bits == 8:
        src = Derived("uint8_to_int8", (src,))
    qw = _add(params, types, f"{base}.qweight", TensorType(DType(qf.qweight_dtype(bits)),
                                                          (nn, cols)), src)
    sc = _add(params, types, f"{base}.scales", TensorType(DType.f32, (nn, groups)),
              Derived("reshape", (s.source,), Attrs({"shape": (nn, groups)})))
    zp = ""
    if len(n.inputs) > 3 and n.inputs[3]:
        z = _const(params, n.inputs[3], n, "zero_points")
        zsrc = (Derived("nibble_zero_points", (z.source,), Attrs({"n": nn, "groups": groups}))
                if bits == 4 and z.type.dtype is DType.u8 else
                Derived("astype_float32", (Derived("reshape", (z.source,),
                                                   Attrs({"shape": (nn, groups)})),)))
        if bits == 8 and z.type.dtype is DType.u8:
            zsrc = Derived("add_scalar", (zsrc,), Attrs({"value": -float(qf.INT8_SHIFT)}))
        zp = _add(params, types, f"{base}.zero_points", TensorType(DType.f32, (nn, groups)), zsrc)
    bias = n.inputs[5] if len(n.inputs) > 5 else ""
    inputs = (n.inputs[0], qw, sc, zp, bias) if bias else (n.inputs[0], qw, sc, zp)
    return Node("quant_linear", inputs, n.outputs[:1],
                Attrs({"bits": bits, "group_size": block, "in_features": k, "out_features": nn,
                       "layout": "nk"}), n.name)


def _qdq_matmul(mm: Node, dq: Node, params: dict, types: dict) -> Node | None:
    """MatMul(x, DequantizeLinear(W[K, N] int8/uint8, scale, zp)) -> quant_linear, or None when
    the quantization axis or dtype has no kiln layout."""
    w = params[dq.inputs[0]]
    if w.type.dtype not in (DType.i8, DType.u8) or len(w.type.shape or ()) != 2:
        return None
    k, nn = w.type.shape
    scale = params.get(dq.inputs[1]) if len(dq.inputs) > 1 else None
    zpar = params.get(dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if scale is None or scale.type.dtype is not DType.f32 or (len(dq.inputs) > 2 and
                                                              dq.inputs[2] and zpar is None):
        return None
    block = int(dq.attrs.get("block_size", 0) or 0)
    axis = int(dq.attrs.get("axis", 1))
    sshape = tuple(scale.type.shape or ())
    if sshape in ((), (1,)):
        group, layout = k, "tensor"
    elif block and axis in (0, -2) and sshape == (-(-k // block), nn) and k % block == 0:
        group, layout = block, "blocked"
    elif not block and axis in (1, -1) and sshape == (nn,):
        group, layout = k, "channel"
    else:
        return None
    groups = k // group
    base = dq.inputs[0]
    qsrc = Derived("transpose", (w.source,), Attrs({"perm": (1, 0)}))  # [K, N] -> [N, K]
    if w.type.dtype is DType.u8:
        qsrc = Derived("uint8_to_int8", (qsrc,))
    qw = _add(params, types, f"{base}.qweight", TensorType(DType.i8, (nn, k)), qsrc)
    sc = _add(params, types, f"{base}.scales", TensorType(DType.f32, (nn, groups)),
              _per_group(scale.source, layout, nn, groups))
    zp = ""
    if zpar is not None or w.type.dtype is DType.u8:
        zsrc = (Derived("astype_float32", (_per_group(zpar.source, layout, nn, groups),))
                if zpar is not None else None)
        if w.type.dtype is DType.u8:
            if zsrc is None:
                raise KilnError(f"node {dq.name} (DequantizeLinear): uint8 weights need a "
                                "zero point")
            zsrc = Derived("add_scalar", (zsrc,), Attrs({"value": -float(qf.INT8_SHIFT)}))
        zp = _add(params, types, f"{base}.zero_points", TensorType(DType.f32, (nn, groups)),
                  zsrc)
    return Node("quant_linear", (mm.inputs[0], qw, sc, zp), mm.outputs, Attrs({
        "bits": 8, "group_size": group, "in_features": k, "out_features": nn, "layout": "nk"}),
        mm.name)


def _per_group(src, layout: str, nn: int, groups: int) -> Derived:
    """A QDQ scale/zero point as [N, G]: broadcast (tensor), a column (channel) or transposed."""
    if layout == "tensor":
        return Derived("broadcast_to", (src,), Attrs({"shape": (nn, groups)}))
    if layout == "channel":
        return Derived("reshape", (src,), Attrs({"shape": (nn, groups)}))
    return Derived("transpose", (src,), Attrs({"perm": (1, 0)}))
