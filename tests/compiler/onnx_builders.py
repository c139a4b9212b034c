"""Small ONNX models built with onnx.helper for the frontend tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

F32 = TensorProto.FLOAT


def tensor(name: str, elem: int, shape: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def model(nodes: Sequence[onnx.NodeProto], inputs: Sequence[onnx.ValueInfoProto],
          outputs: Sequence[onnx.ValueInfoProto], inits: Sequence[onnx.TensorProto] = (),
          *, opset: int = 18, value_info: Sequence[onnx.ValueInfoProto] = ()) -> onnx.ModelProto:
    g = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(inits),
                          value_info=list(value_info))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)],
                          producer_name="kiln-tests")
    m.ir_version = 9
    return m


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def mlp(rng: np.random.Generator) -> onnx.ModelProto:
    """y = relu(x @ W + b) with x [batch, 4] and a 4x3 weight."""
    w = init("W", rng.standard_normal((4, 3)).astype(np.float32))
    b = init("b", rng.standard_normal(3).astype(np.float32))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
             helper.make_node("Relu", ["hb"], ["y"], name="relu")]
    return model(nodes, [tensor("x", F32, ["batch", 4])], [tensor("y", F32, ["batch", 3])],
                 [w, b])
