"""ONNX tensors and attributes -> kiln Params (inline or memory-mapped external data) and Attrs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import AttrValue, DType, ExternalData, Inline, Param, TensorType

DTYPES: dict[int, DType] = {
    TensorProto.FLOAT: DType.f32, TensorProto.FLOAT16: DType.f16,
    TensorProto.BFLOAT16: DType.bf16, TensorProto.DOUBLE: DType.f64,
    TensorProto.INT64: DType.i64, TensorProto.INT32: DType.i32, TensorProto.INT16: DType.i16,
    TensorProto.INT8: DType.i8, TensorProto.UINT8: DType.u8, TensorProto.BOOL: DType.bool,
    TensorProto.INT4: DType.i4, TensorProto.UINT4: DType.u4,
}

#: (op, attribute) pairs whose integer value is an ONNX element type
DTYPE_ATTRS = {
    ("Cast", "to"), ("EyeLike", "dtype"), ("RandomNormal", "dtype"), ("RandomUniform", "dtype"),
    ("RandomNormalLike", "dtype"), ("RandomUniformLike", "dtype"), ("Multinomial", "dtype"),
    ("Bernoulli", "dtype"), ("QuantizeLinear", "output_dtype"),
    ("DequantizeLinear", "output_dtype"), ("Attention", "softmax_precision"),
}


def dtype(elem_type: int, what: str) -> DType:
    """The kiln dtype of an ONNX element type; `what` names the value for the error message."""
    if elem_type in DTYPES:
        return DTYPES[elem_type]
    name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() \
        else str(elem_type)
    raise KilnError(f"{what} has element type {name}, which kiln does not support")


def tensor_param(name: str, t: TensorProto, base_dir: Path, *,
                 weights_optional: bool = False) -> Param:
    """A Param for an initializer or a Constant's tensor: inline data or a lazy external file."""
    dt = dtype(t.data_type, f"tensor {t.name or name}")
    shape = tuple(int(d) for d in t.dims)
    if t.data_location == TensorProto.EXTERNAL:
        source = _external(t, base_dir, dt, shape, weights_optional)
        return Param(name, TensorType(dt, shape), source)
    if t.HasField("segment"):
        raise KilnError(f"tensor {t.name}: segmented tensors are not supported")
    return Param(name, TensorType(dt, shape), Inline(_inline_array(t, name, dt, shape)))


def _inline_array(t: TensorProto, name: str, dt: DType, shape: tuple[int, ...]) -> np.ndarray:
    """The data of a tensor held in the ONNX file, checked against its declared dims first
    (numpy_helper would otherwise fail with a bare reshape error)."""
    what = f"tensor {t.name or name}"
    if any(d < 0 for d in shape):
        raise KilnError(f"{what}: negative dim in its dims {list(shape)}")
    count = math.prod(shape)
    if t.HasField("raw_data"):
        need = math.ceil(count * dt.itemsize)
        if len(t.raw_data) != need:
            raise KilnError(f"{what}: raw data holds {len(t.raw_data)} bytes, its dims "
                            f"{list(shape)} of {dt.value} need {need}")
    else:
        have = len(getattr(t, helper.tensor_dtype_to_field(t.data_type)))
        if have != count and not (dt.itemsize < 1 and have == math.ceil(count * dt.itemsize)):
            raise KilnError(f"{what}: holds {have} values, its dims {list(shape)} need {count}")
    try:
        arr = np.asarray(numpy_helper.to_array(t), dt.numpy)
    except (ValueError, TypeError) as e:
        raise KilnError(f"{what}: unreadable data ({type(e).__name__}: {e})") from e
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise KilnError(f"{what}: holds {int(np.isnan(arr).sum())} NaN values (a corrupt "
                        "weight; infinities are accepted, NaN never is)")
    return arr


def _external(t: TensorProto, base_dir: Path, dt: DType, shape: tuple[int, ...],
              weights_optional: bool) -> ExternalData:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not location or os.path.isabs(location):
        raise KilnError(f"tensor {t.name}: external data location {location!r} must be a path "
                        "relative to the model's folder")
    path = os.path.normpath(base_dir / location)
    offset = int(info.get("offset", 0))
    need = math.ceil(math.prod(shape) * dt.itemsize)
    length = int(info["length"]) if "length" in info else need
    if length < need:
        raise KilnError(f"tensor {t.name}: external data length {length} is less than the "
                        f"{need} bytes its shape {list(shape)} needs")
    if not os.path.isfile(path):
        if not weights_optional:
            raise KilnError(f"external data file {location} is missing (tensor {t.name}, "
                            f"expected at {path})")
    elif os.path.getsize(path) < offset + need:
        raise KilnError(f"external data file {location} has {os.path.getsize(path)} bytes; "
                        f"tensor {t.name} needs bytes [{offset}, {offset + need})")
    return ExternalData(path, offset, length, dt, shape)


def constant_param(node: onnx.NodeProto, name: str, base_dir: Path, *,
                   weights_optional: bool = False) -> Param:
    """The Param a Constant node stands for (value, value_float(s), value_int(s))."""
    if len(node.attribute) != 1:
        raise KilnError(f"node {node.name or name} (Constant) must have exactly one value "
                        "attribute")
    a = node.attribute[0]
    if a.name == "value":
        return tensor_param(name, a.t, base_dir, weights_optional=weights_optional)
    scalars = {"value_float": np.float32(a.f), "value_floats": np.array(a.floats, np.float32),
               "value_int": np.int64(a.i), "value_ints": np.array(a.ints, np.int64)}
    if a.name not in scalars:
        raise KilnError(f"node {node.name or name} (Constant): attribute {a.name} is not "
                        "supported (kiln has no sparse or string tensors)")
    arr = np.asarray(scalars[a.name])
    return Param(name, TensorType(DType.of(arr), arr.shape), Inline(arr))


def attrs(node: onnx.NodeProto, op: str, where: str) -> dict[str, AttrValue]:
    """The node's attributes as kiln attribute values, ONNX names kept, no defaults filled."""
    out: dict[str, AttrValue] = {}
    for a in node.attribute:
        if op == "ConstantOfShape" and a.name == "value":
            arr = numpy_helper.to_array(a.t).reshape(-1)
            out["dtype"] = dtype(a.t.data_type, f"{where}: attribute value")
            out["value"] = arr[0].item() if arr.size else 0
        elif (op, a.name) in DTYPE_ATTRS:
            out[a.name] = dtype(a.i, f"{where}: attribute {a.name}")
        else:
            out[a.name] = _attr_value(a, where)
    return out


def _attr_value(a: AttributeProto, where: str) -> AttrValue:
    kind = a.type
    if kind == AttributeProto.FLOAT:
        return float(a.f)
    if kind == AttributeProto.INT:
        return int(a.i)
    if kind == AttributeProto.STRING:
        return a.s.decode("utf-8", errors="replace")
    if kind == AttributeProto.FLOATS:
        return tuple(float(x) for x in a.floats)
    if kind == AttributeProto.INTS:
        return tuple(int(x) for x in a.ints)
    if kind == AttributeProto.STRINGS:
        return tuple(s.decode("utf-8", errors="replace") for s in a.strings)
    kind_name = AttributeProto.AttributeType.Name(kind)
    raise KilnError(f"{where}: attribute {a.name} of type {kind_name} is not supported "
                    "(kiln imports no tensor or subgraph attributes)")
