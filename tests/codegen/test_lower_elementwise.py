"""Generic element-wise lowerings (Relu ... Where) compiled and run against the interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.ir import BATCH, SEQ, DType, Graph, Node, TensorType, inline_param, sym
from tests.helpers import assert_close

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from kiln.codegen.build import build_module, compile_module  # noqa: E402
from kiln.codegen.targets import host_cpu  # noqa: E402

E = 37  # odd: the flat maps' vector tails run


def _graph(nodes: list[Node], types: dict[str, TensorType], params: list) -> Graph:
    shape = (sym(BATCH), sym(SEQ), E)
    types = {"x": TensorType(DType.f32, shape), "y": TensorType(DType.f32, shape),
             **{k: TensorType(v, shape) for k, v in types.items()}}
    for p in params:
        types[p.name] = p.type
    return Graph(tuple(nodes), ("x", "y"), ("out",), types, {p.name: p for p in params})


def _chain() -> Graph:
    f32, b = DType.f32, DType.bool
    nodes = [Node("Relu", ("x",), ("r",), name="relu"), Node("Tanh", ("y",), ("t",), name="tanh"),
             Node("Sigmoid", ("r",), ("s",), name="sig"), Node("Neg", ("t",), ("n",), name="neg"),
             Node("Erf", ("x",), ("e",), name="erf"),
             Node("Clip", ("e", "lo", "hi"), ("c",), name="clip"),
             Node("Sub", ("s", "n"), ("d",), name="sub"),
             Node("Cast", ("x",), ("xb",), {"to": DType.bool}, name="cast"),
             Node("Cast", ("xb",), ("xf",), {"to": DType.f32}, name="cast2"),
             Node("Add", ("xf", "c"), ("c2",), name="add"),
             Node("Div", ("d", "c2"), ("q",), name="div"),
             Node("Pow", ("q", "two"), ("p",), name="pow"),
             Node("Where", ("xb", "p", "y"), ("out",), name="where")]
    types = {k: f32 for k in ("r", "t", "s", "n", "e", "c", "d", "q", "p", "xf", "c2", "out")}
    types["xb"] = b
    params = [inline_param("lo", np.array(-0.5, np.float32)),
              inline_param("hi", np.array(0.75, np.float32)),
              inline_param("two", np.array(2.0, np.float32))]
    return _graph(nodes, types, params)


def test_generic_elementwise_ops(rng):
    graph = _chain()
    mod, sig = build_module(graph, host_cpu(), entry_points=("prefill",))
    vm = tvm.runtime.vm.VirtualMachine(compile_module(mod, host_cpu()), tvm.cpu())
    x = rng.standard_normal((2, 5, E), dtype=np.float32)
    x[0, 0, :4] = 0  # Cast to bool sees zeros
    y = rng.standard_normal((2, 5, E), dtype=np.float32)
    params = tuple(tvm.runtime.tensor(graph.params[p].load()) for p in sig.params)
    got = vm["prefill"](tvm.runtime.ShapeTuple([0]), tvm.runtime.tensor(x),
                        tvm.runtime.tensor(y), (), params).numpy()
    want = run(graph, {"x": x, "y": y}, outputs=["out"])["out"]
    assert_close(got, want, atol=1e-5, name="generic element-wise chain")


def test_op_without_lowering_names_op_node_and_target():
    graph = _graph([Node("Softplus", ("x",), ("out",), name="sp")], {"out": DType.f32}, [])
    with pytest.raises(KilnError, match="no lowering for op Softplus \\(node sp\\) on target cpu"):
        build_module(graph, host_cpu(), entry_points=("prefill",))
