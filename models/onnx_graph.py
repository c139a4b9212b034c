"""Small ONNX graph builder whose weights live in one external data file written on demand.

The graph (`model.onnx`) declares every weight as an external initializer with its offset and
length fixed up front, so the graph alone is loadable with shapes only; the data file is written
later (or never) by streaming arrays from a provider in declaration order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18
IR_VERSION = 8
ALIGN = 64

#: a provider returns the array of one weight, in the layout the graph declares
WeightProvider = Callable[[str], np.ndarray]


@dataclass(frozen=True)
class WeightSpec:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * 4


class GraphBuilder:
    """Appends ONNX nodes with generated value names; weights are float32 external data."""

    def __init__(self, name: str, data_file: str) -> None:
        self.name, self.data_file = name, data_file
        self.nodes: list[onnx.NodeProto] = []
        self.constants: list[TensorProto] = []
        self.weights: list[WeightSpec] = []
        self._const_names: dict[tuple[str, tuple[int, ...], bytes], str] = {}
        self._end = 0
        self._count = 0

    def _fresh(self, hint: str) -> str:
        self._count += 1
        return f"/{hint}_{self._count}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, **attrs: object) -> str:
        """Add one node; returns its output name (use `op_multi` for several outputs)."""
        return self.op_multi(op_type, *inputs, n_out=n_out, **attrs)[0]

    def op_multi(self, op_type: str, *inputs: str, n_out: int, **attrs: object) -> list[str]:
        outs = [self._fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def const(self, value: np.ndarray | Sequence[int] | float, hint: str = "const") -> str:
        """Small embedded initializer (shape tensors, scalars, inv_freq); equal values shared."""
        arr = np.asarray(value)
        if arr.dtype == np.float64:
            arr = arr.astype(np.float32)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._const_names:
            self._const_names[key] = name = self._fresh(hint)
            self.constants.append(numpy_helper.from_array(arr, name))
        return self._const_names[key]

    def ints(self, *values: int) -> str:
        return self.const(np.array(values, dtype=np.int64), "ints")

    def weight(self, name: str, shape: Sequence[int]) -> str:
        """Declare a float32 weight stored in the external data file."""
        spec = WeightSpec(name, tuple(int(d) for d in shape), self._end)
        self.weights.append(spec)
        self._end = -(-(spec.offset + spec.nbytes) // ALIGN) * ALIGN
        return name

    def _external(self, spec: WeightSpec) -> TensorProto:
        t = TensorProto(name=spec.name, data_type=TensorProto.FLOAT, dims=spec.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, val in (("location", self.data_file), ("offset", spec.offset),
                         ("length", spec.nbytes)):
            t.external_data.add(key=key, value=str(val))
        return t

    def model(self, inputs: list[onnx.ValueInfoProto],
              outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        inits = [self._external(s) for s in self.weights] + self.constants
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="kiln.models")
        model.ir_version = IR_VERSION
        return model

    def save(self, model: onnx.ModelProto, path: Path) -> Path:
        """Write the graph only (the data file is not touched)."""
        path.write_bytes(model.SerializeToString())
        return path

    def write_weights(self, path: Path, provider: WeightProvider,
                      progress: Callable[[str], None] | None = None) -> Path:
        """Stream every declared weight into the data file at its offset."""
        with path.open("wb") as f:
            for spec in self.weights:
                arr = np.ascontiguousarray(provider(spec.name), dtype=np.float32)
                if arr.shape != spec.shape:
                    raise ValueError(f"weight {spec.name}: shape {arr.shape} != {spec.shape}")
                f.seek(spec.offset)
                f.write(arr.tobytes())
                if progress:
                    progress(spec.name)
            f.truncate(self._end)
        return path


def tensor_input(name: str, elem: int, dims: Iterable[int | str]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, list(dims))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    """Node count per op type, most frequent first."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
