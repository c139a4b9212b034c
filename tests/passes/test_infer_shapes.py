"""infer_shapes: types for untyped values, agreement with declared types, and speed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import DType, Graph, Node, TensorType, sym
from kiln.passes.infer_shapes import infer_shapes
from tests.passes.builder import GraphBuilder

B, S = sym("batch"), sym("seq")
DATA = Path(__file__).parents[1] / "data"


def _untyped(g: Graph) -> Graph:
    keep = set(g.inputs) | set(g.outputs) | set(g.params)
    return g.replace(types={v: t for v, t in g.types.items() if v in keep})


def shape_chain() -> Graph:
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", "seq", 64))
    dims = b.op("Shape", x)
    seq = b.op("Gather", dims, b.const(1, np.int64), axis=0)
    target = b.op("Concat", b.ints(0), b.op("Unsqueeze", seq, b.ints(0)), b.ints(4, 16), axis=0)
    return b.build(b.op("Reshape", x, target))


def test_types_every_value_through_shape_arithmetic():
    g = shape_chain()
    h = infer_shapes(_untyped(g).replace(types={**_untyped(g).types,
                                                g.outputs[0]: TensorType(DType.f32, None)}))
    assert h.types[g.outputs[0]] == TensorType(DType.f32, (B, S, 4, 16))
    assert all(o in h.types for n in h.nodes for o in n.outputs)


def test_prefers_the_more_specific_dim():
    g = shape_chain()
    out = g.outputs[0]
    vague = TensorType(DType.f32, (sym("unk900"), sym("s9"), 4, 16))
    h = infer_shapes(g.replace(types={**g.types, out: vague}))
    assert h.types[out].shape == (B, S, 4, 16)
    precise = TensorType(DType.f32, (3, S, 4, 16))
    assert infer_shapes(g.replace(types={**g.types, out: precise})).types[out] == precise


@pytest.mark.parametrize("declared", [
    TensorType(DType.f16, (B, S, 4, 16)), TensorType(DType.f32, (B, S, 64)),
    TensorType(DType.f32, (B, S, 8, 16)),
])
def test_contradicting_declaration_raises_one_line(declared):
    g = shape_chain()
    with pytest.raises(KilnError, match=r"Reshape.*declared") as e:
        infer_shapes(g.replace(types={**g.types, g.outputs[0]: declared}))
    assert "\n" not in str(e.value)


def test_strict_raises_on_untypeable_output():
    g = Graph((Node("NoSuchOp", ("x",), ("y",), name="n"),), ("x",), ("x",),
              {"x": TensorType(DType.f32, (2,))}, {})
    with pytest.raises(KilnError, match=r"n \(NoSuchOp\): cannot infer"):
        infer_shapes(g)
    assert "y" not in infer_shapes(g, strict=False).types


def test_real_exports_are_typed():
    from kiln.compiler.frontend.onnx import load_onnx

    for name in ("llama-optimum", "gpt2-optimum", "qwen2-dynamo"):
        g = _untyped(load_onnx(DATA / f"{name}.onnx", infer_shapes=False))
        h = infer_shapes(g)
        assert all(o in h.types for n in h.nodes for o in n.outputs if o)
        assert h.types["logits"].shape == (B, S, 256)
