"""A tiny IR builder for pass tests: ONNX-level graphs written as code, types inferred."""

from __future__ import annotations

import numpy as np

from kiln.compiler.ir import DType, Graph, Node, TensorType, dim, inline_param
from kiln.passes import get_pass


class GraphBuilder:
    def __init__(self):
        self.nodes: list[Node] = []
        self.inputs: list[str] = []
        self.types: dict[str, TensorType] = {}
        self.params: dict = {}
        self._n = 0

    def input(self, name: str, dtype: DType, shape) -> str:
        self.inputs.append(name)
        self.types[name] = TensorType(dtype, tuple(dim(d) for d in shape))
        return name

    def const(self, value, dtype=np.float32, name: str | None = None) -> str:
        name = name or f"c{len(self.params)}"
        p = inline_param(name, np.asarray(value, dtype), computed=False)
        self.params[name] = p
        self.types[name] = p.type
        return name

    def ints(self, *values: int) -> str:
        return self.const(list(values), np.int64)

    def op(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        self._n += 1
        outs = [f"{op.lower()}{self._n}" + (f"_{i}" if outputs > 1 else "")
                for i in range(outputs)]
        self.nodes.append(Node(op, tuple(inputs), tuple(outs), attrs, f"{op}_{self._n}"))
        return outs[0] if outputs == 1 else outs

    def build(self, *outputs: str) -> Graph:
        g = Graph(tuple(self.nodes), tuple(self.inputs), tuple(outputs), dict(self.types),
                  dict(self.params))
        return get_pass("infer_shapes")(g)


def canonicalize(graph: Graph) -> Graph:
    from kiln.passes import PassContext, run_pipeline

    return run_pipeline(graph, "canonicalize", PassContext(verify=True))
