"""ONNX frontend: an ONNX model (opsets 13-23) -> a typed, topologically sorted kiln Graph.

External weights are never read here: they become memory-mapped ExternalData params. Every
input error is a one-line KilnError naming the file and the node, op or value at fault.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx

from kiln.compiler.errors import KilnError, UnsupportedOps
from kiln.compiler.frontend.graph_order import check_ssa, toposort
from kiln.compiler.frontend.onnx_dims import DimNamer
from kiln.compiler.frontend.onnx_quant_import import IMPORTED_OPS, import_quantized
from kiln.compiler.frontend.onnx_tensors import attrs, constant_param, dtype, tensor_param
from kiln.compiler.ir import Graph, Node, Param, TensorType

OPSETS = range(13, 24)
MS_DOMAIN = "com.microsoft"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_CORRUPT = "not a valid ONNX model (truncated or corrupt protobuf)"


def load_onnx(path: str | Path, *, weights_optional: bool = False,
              infer_shapes: bool = True) -> Graph:
    """Load an ONNX file as a kiln Graph (external data memory-mapped, not read).

    weights_optional: accept missing external data files (shapes-only use: inspect, --no-weights).
    infer_shapes: run kiln's infer_shapes pass and the verifier on the imported graph.
    """
    path = Path(path)
    model = _read(path)
    return load_onnx_model(model, path_hint=path, weights_optional=weights_optional,
                           infer_shapes=infer_shapes)


def load_onnx_model(model: onnx.ModelProto, *, path_hint: str | Path = "<model>",
                    weights_optional: bool = False, infer_shapes: bool = True) -> Graph:
    """Convert an in-memory ModelProto; external data resolves relative to path_hint's folder."""
    where = str(path_hint)
    try:
        graph = _convert(model, where, Path(path_hint).parent, weights_optional)
        if infer_shapes:
            graph = _infer_and_verify(graph)
    except UnsupportedOps:
        raise
    except KilnError as e:
        msg = str(e)
        raise KilnError(msg if msg.startswith(f"{where}:") else f"{where}: {msg}") from e
    return graph


def _read(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise KilnError(f"{path}: no such file")
    if not path.is_file():
        raise KilnError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise KilnError(f"{path}: not a valid ONNX model (empty file)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, RuntimeWarning-ish ValueErrors, ...
        raise KilnError(f"{path}: {_CORRUPT}") from e
    if not model.HasField("graph") or not model.opset_import or model.ir_version <= 0:
        raise KilnError(f"{path}: {_CORRUPT}")
    return model


def _convert(model: onnx.ModelProto, where: str, base_dir: Path,
             weights_optional: bool) -> Graph:
    opset = _check_opset(model)
    if model.functions:
        import onnx.inliner

        model = onnx.inliner.inline_local_functions(model)
    g = model.graph
    if g.sparse_initializer:
        raise KilnError(f"sparse initializer {g.sparse_initializer[0].values.name} "
                        "is not supported")
    params = {t.name: tensor_param(t.name, t, base_dir, weights_optional=weights_optional)
              for t in g.initializer}
    _check_ops(g, where)
    names = DimNamer.from_inputs(g.input)
    inputs = tuple(vi.name for vi in g.input if vi.name not in params)
    types: dict[str, TensorType] = {n: p.type for n, p in params.items()}
    for vi in g.input:
        if vi.name not in params:
            types[vi.name] = _value_type(vi, names, required=True)
            fixed = [d.dim_value for d in vi.type.tensor_type.shape.dim
                     if d.HasField("dim_value")]
            if any(d < 0 for d in fixed):
                raise KilnError(f"input {vi.name} declares a dim of {min(fixed)} (a dim is "
                                "never negative; a corrupt or mis-edited export)")
    nodes = import_quantized(_convert_nodes(g, params, types, base_dir, weights_optional,
                                            opset), params, types)
    _check_imported(nodes, where)
    for vi in (*g.value_info, *g.output):
        if vi.name not in types and vi.type.tensor_type.elem_type:
            types[vi.name] = _value_type(vi, names, required=False)
    check_ssa(nodes, (*inputs, *params))
    nodes = toposort(nodes, (*inputs, *params))
    meta = _meta(model, where, opset, names)
    return Graph(nodes=tuple(nodes), inputs=inputs, outputs=tuple(o.name for o in g.output),
                 types=types, params=params, name=g.name or "main", meta=meta)


def _check_opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS]
    if not versions:
        raise KilnError("the model imports no default-domain ONNX opset")
    if versions[0] not in OPSETS:
        raise KilnError(f"opset {versions[0]} is not supported (kiln supports opsets "
                        f"{OPSETS.start}-{OPSETS.stop - 1}; re-export with one of them)")
    return versions[0]


def op_name(node: onnx.NodeProto) -> str:
    """The kiln op name of an ONNX node: op_type, or "com.microsoft.X" for that domain."""
    if node.domain in _DEFAULT_DOMAINS:
        return node.op_type
    if node.domain == MS_DOMAIN:
        return f"{MS_DOMAIN}.{node.op_type}"
    raise KilnError(f"node {node.name or '?'} ({node.op_type}) is in domain {node.domain!r}; "
                    f"kiln imports the default ONNX domain and {MS_DOMAIN} only")


def _check_ops(g: onnx.GraphProto, where: str) -> None:
    """Raise UnsupportedOps listing every op type that has no kiln kernel."""
    from kiln.compiler.interpreter import KERNELS

    missing: dict[str, tuple[int, str]] = {}
    for i, node in enumerate(g.node):
        op = op_name(node)
        if op == "Constant" or op in KERNELS or op in IMPORTED_OPS:
            continue
        count, first = missing.get(op, (0, node.name or f"{node.op_type}_{i}"))
        missing[op] = (count + 1, first)
    if missing:
        raise UnsupportedOps(where, missing)


def _check_imported(nodes: list[Node], where: str) -> None:
    """Quantized-weight ops left over (not on a constant weight feeding a MatMul) are refused."""
    left: dict[str, tuple[int, str]] = {}
    for n in nodes:
        if n.op in IMPORTED_OPS:
            count, first = left.get(n.op, (0, n.name))
            left[n.op] = (count + 1, first)
    if left:
        raise UnsupportedOps(where, left)


def _value_type(vi: onnx.ValueInfoProto, names: DimNamer, *, required: bool) -> TensorType:
    if not vi.type.HasField("tensor_type"):
        kind = vi.type.WhichOneof("value") or "untyped"
        raise KilnError(f"value {vi.name} has type {kind}; kiln imports tensors only")
    tt = vi.type.tensor_type
    if not tt.elem_type and required:
        raise KilnError(f"input {vi.name} declares no element type")
    return TensorType(dtype(tt.elem_type, f"value {vi.name}"), names.shape(vi.name, vi.type))


def _convert_nodes(g: onnx.GraphProto, params: dict[str, Param],
                   types: dict[str, TensorType], base_dir: Path,
                   weights_optional: bool, opset: int) -> list[Node]:
    """IR nodes for the graph's nodes; Constant nodes become params (and types) instead."""
    nodes: list[Node] = []
    used: set[str] = set()
    for i, n in enumerate(g.node):
        name = _unique_name(n.name or f"{n.op_type}_{i}", used)
        if n.op_type == "Constant" and n.domain in _DEFAULT_DOMAINS:
            if len(n.output) != 1 or n.output[0] in params:
                raise KilnError(f"node {name} (Constant) must define one new value")
            p = constant_param(n, n.output[0], base_dir, weights_optional=weights_optional)
            params[p.name], types[p.name] = p, p.type
            continue
        op = op_name(n)
        _check_arity(n, name, opset)
        node_attrs = attrs(n, op, f"node {name} ({op})")
        if op == "Split" and not (n.input[1:2] and n.input[1]) and "num_outputs" not in \
                node_attrs:
            node_attrs["num_outputs"] = len(n.output)  # opset 13: the arity sets the parts
        nodes.append(Node(op, tuple(n.input), tuple(n.output), node_attrs, name))
    return nodes


def _check_arity(n: onnx.NodeProto, name: str, opset: int) -> None:
    """A default-domain node has as many inputs and outputs as its ONNX schema allows (a
    rewired or corrupted export can hand a Mul one input; every later stage assumes two)."""
    if n.domain not in _DEFAULT_DOMAINS:
        return
    try:
        schema = onnx.defs.get_schema(n.op_type, opset, "")
    except onnx.defs.SchemaError:
        return  # not an ONNX op: _check_ops has refused it already unless kiln defines it
    ins, outs = len(n.input), len(n.output)
    if not schema.min_input <= ins <= schema.max_input:
        raise KilnError(f"node {name} ({n.op_type}) has {ins} inputs; opset {opset} allows "
                        f"{schema.min_input}..{schema.max_input}")
    if not schema.min_output <= outs <= schema.max_output:
        raise KilnError(f"node {name} ({n.op_type}) has {outs} outputs; opset {opset} allows "
                        f"{schema.min_output}..{schema.max_output}")


def _unique_name(name: str, used: set[str]) -> str:
    candidate, k = name, 1
    while candidate in used:
        candidate, k = f"{name}_{k}", k + 1
    used.add(candidate)
    return candidate


def _meta(model: onnx.ModelProto, where: str, opset: int, names: DimNamer) -> dict[str, Any]:
    g = model.graph
    inits = {t.name for t in g.initializer}
    return {
        "opset": opset,
        "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer_name": model.producer_name,
        "producer_version": model.producer_version,
        "model_path": os.path.abspath(where) if where != "<model>" else where,
        "ir_version": model.ir_version,
        "onnx_inputs": tuple(vi.name for vi in g.input if vi.name not in inits),
        "onnx_outputs": tuple(vi.name for vi in g.output),
        "dim_names": names.names(),
    }


def _infer_and_verify(graph: Graph) -> Graph:
    from kiln.compiler.verify import verify
    from kiln.passes import get_pass

    graph = get_pass("infer_shapes")(graph)
    verify(graph)
    return graph
