"""Seeded faults for fuzzing: one function per fault kind, each turning a valid ONNX export (or a
compiled artifact) into a broken one, with a short description of what it did."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper

Rng = np.random.Generator
#: (model, rng) -> (serialized mutant, what was done)
ModelMutator = Callable[[onnx.ModelProto, Rng], tuple[bytes, str]]


def _pick(rng: Rng, items):
    items = list(items)
    return items[int(rng.integers(len(items)))]


def _raw_inits(m: onnx.ModelProto) -> list[TensorProto]:
    """Initializers holding raw data (the weights), largest last."""
    return [t for t in m.graph.initializer if t.raw_data]


def _ser(m: onnx.ModelProto) -> bytes:
    return m.SerializeToString()


# -- structure -----------------------------------------------------------------------------

def drop_node(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    i = int(rng.integers(len(m.graph.node)))
    name = m.graph.node[i].name
    del m.graph.node[i]
    return _ser(m), f"dropped node {name}"


def rewire_node(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    """One input of a node now reads another value (maybe later in the graph: a cycle), or a
    value that does not exist."""
    node = _pick(rng, [n for n in m.graph.node if n.input])
    k = int(rng.integers(len(node.input)))
    values = [o for n in m.graph.node for o in n.output] + [i.name for i in m.graph.input]
    new = "no_such_value" if rng.random() < 0.2 else _pick(rng, values)
    old, node.input[k] = node.input[k], new
    return _ser(m), f"node {node.name} input {k}: {old} -> {new}"


def wrong_dims(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    """An initializer's dims changed, its data left as it was (issue 16's traceback)."""
    t = _pick(rng, [t for t in m.graph.initializer if t.dims])
    old = list(t.dims)
    j = int(rng.integers(len(t.dims)))
    t.dims[j] = max(0, t.dims[j] + int(_pick(rng, (-1, 1, 2, 7))))
    return _ser(m), f"initializer {t.name} dims {old} -> {list(t.dims)}"


def truncate_data(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    t = _pick(rng, _raw_inits(m))
    n = len(t.raw_data)
    keep = int(rng.integers(0, n))
    t.raw_data = t.raw_data[:keep]
    return _ser(m), f"initializer {t.name} raw data {n} -> {keep} bytes"


def oversize_data(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    t = _pick(rng, _raw_inits(m))
    extra = int(rng.integers(1, 4097))
    t.raw_data = t.raw_data + rng.bytes(extra)
    return _ser(m), f"initializer {t.name} raw data +{extra} bytes"


_ODD_INTS = (-(2**62), -9, -1, 0, 1, 3, 99, 2**31, 2**62)


def bad_attribute(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    """An attribute given an odd value, another type, or removed; or an unknown one added."""
    node = _pick(rng, m.graph.node)
    how = _pick(rng, ("value", "type", "remove", "add") if node.attribute else ("add",))
    if how == "add":
        node.attribute.append(helper.make_attribute("kiln_fuzz", int(rng.integers(9))))
        return _ser(m), f"node {node.name}: unknown attribute added"
    k = int(rng.integers(len(node.attribute)))
    a = node.attribute[k]
    if how == "remove":
        del node.attribute[k]
        return _ser(m), f"node {node.name}: attribute {a.name} removed"
    if how == "type":
        node.attribute[k].CopyFrom(helper.make_attribute(a.name, "fuzz"))
        return _ser(m), f"node {node.name}: attribute {a.name} made a string"
    if a.type == AttributeProto.INT:
        a.i = int(_pick(rng, _ODD_INTS))
    elif a.type == AttributeProto.INTS:
        a.ints[:] = [int(_pick(rng, _ODD_INTS)) for _ in range(int(rng.integers(0, 4)))]
    elif a.type == AttributeProto.FLOAT:
        a.f = float(_pick(rng, (float("nan"), float("inf"), -1.0, 0.0, 1e30)))
    elif a.type == AttributeProto.TENSOR:
        a.t.CopyFrom(numpy_helper.from_array(np.array([float("nan"), 1.0], np.float32)))
    else:
        node.attribute[k].CopyFrom(helper.make_attribute(a.name, int(_pick(rng, _ODD_INTS))))
    return _ser(m), f"node {node.name}: attribute {a.name} given an odd value"


_OPS = ("Add", "Mul", "MatMul", "Gather", "Reshape", "Transpose", "Softmax", "Concat", "Relu",
        "Cast", "Where", "Slice", "Unsqueeze", "Identity", "Sqrt", "Conv", "LSTM", "NoSuchOp")


def swap_op_type(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    node = _pick(rng, m.graph.node)
    old, node.op_type = node.op_type, _pick(rng, [o for o in _OPS if o != node.op_type])
    return _ser(m), f"node {node.name}: {old} -> {node.op_type}"


def duplicate_output(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    """Two nodes (or a node and an initializer/input) define the same value name."""
    node = _pick(rng, [n for n in m.graph.node if n.output])
    names = ([o for n in m.graph.node for o in n.output if n is not node] +
             [i.name for i in m.graph.input])
    new = _pick(rng, names)
    node.output[0] = new
    return _ser(m), f"node {node.name} output 0 renamed {new} (defined twice)"


def odd_opset(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    how = _pick(rng, ("version", "domain", "none", "twice"))
    default = next(o for o in m.opset_import if o.domain in ("", "ai.onnx"))
    if how == "version":
        default.version = int(_pick(rng, (1, 7, 12, 24, 99, -3)))
        return _ser(m), f"opset version {default.version}"
    if how == "domain":
        default.domain = "com.example"
        return _ser(m), "default opset moved to domain com.example"
    if how == "none":
        del m.opset_import[:]
        return _ser(m), "no opset_import"
    m.opset_import.append(helper.make_opsetid("", int(_pick(rng, (9, 17)))))
    return _ser(m), "default opset imported twice"


def remove_input(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    k = int(rng.integers(len(m.graph.input)))
    name = m.graph.input[k].name
    del m.graph.input[k]
    return _ser(m), f"graph input {name} removed"


def retype_input(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    vi = _pick(rng, m.graph.input)
    tt = vi.type.tensor_type
    how = _pick(rng, ("elem", "rank", "static"))
    if how == "elem":
        tt.elem_type = int(_pick(rng, (TensorProto.FLOAT16, TensorProto.STRING, TensorProto.INT8,
                                       TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.INT64,
                                       TensorProto.COMPLEX64, 0)))
        return _ser(m), f"graph input {vi.name} elem type {tt.elem_type}"
    if how == "rank":
        tt.shape.dim.add().dim_value = 3
        return _ser(m), f"graph input {vi.name} given an extra dim"
    for d in tt.shape.dim:
        d.dim_value = int(_pick(rng, (0, 1, 5)))
    return _ser(m), f"graph input {vi.name} dims fixed to {[d.dim_value for d in tt.shape.dim]}"


def nan_inf_weights(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    t = _pick(rng, [t for t in _raw_inits(m) if t.data_type == TensorProto.FLOAT])
    a = numpy_helper.to_array(t).copy()
    flat = a.reshape(-1)
    bad = _pick(rng, (np.nan, np.inf, -np.inf))
    idx = rng.choice(flat.size, size=max(1, flat.size // 100), replace=False)
    flat[idx] = bad
    t.raw_data = a.tobytes()
    return _ser(m), f"initializer {t.name}: {idx.size} values set to {bad}"


def huge_dims(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    """A declared dim so large that any allocation of it must fail."""
    big = int(_pick(rng, (2**31, 2**40, 2**62, 10**12)))
    if rng.random() < 0.5:
        t = _pick(rng, [t for t in m.graph.initializer if t.dims])
        t.dims[int(rng.integers(len(t.dims)))] = big
        return _ser(m), f"initializer {t.name} dims {list(t.dims)}"
    vi = _pick(rng, [vi for vi in m.graph.input if vi.type.tensor_type.shape.dim])
    dims = vi.type.tensor_type.shape.dim
    dims[int(rng.integers(len(dims)))].dim_value = big
    return _ser(m), f"graph input {vi.name} declared dim {big}"


def flip_bytes(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    data = bytearray(_ser(m))
    k = int(rng.integers(1, 9))
    at = rng.choice(len(data), size=k, replace=False)
    for i in at:
        data[i] ^= 1 << int(rng.integers(8))
    return bytes(data), f"{k} bits flipped at {sorted(int(i) for i in at)[:4]}..."


def truncate_file(m: onnx.ModelProto, rng: Rng) -> tuple[bytes, str]:
    data = _ser(m)
    keep = int(rng.integers(0, len(data)))
    return data[:keep], f"file cut to {keep} of {len(data)} bytes"


#: fault kind -> mutator of an ONNX model
MODEL_MUTATORS: dict[str, ModelMutator] = {
    "drop_node": drop_node,
    "rewire_node": rewire_node,
    "wrong_dims": wrong_dims,
    "truncate_data": truncate_data,
    "oversize_data": oversize_data,
    "bad_attribute": bad_attribute,
    "swap_op_type": swap_op_type,
    "duplicate_output": duplicate_output,
    "odd_opset": odd_opset,
    "remove_input": remove_input,
    "retype_input": retype_input,
    "nan_inf_weights": nan_inf_weights,
    "huge_dims": huge_dims,
    "flip_bytes": flip_bytes,
    "truncate_file": truncate_file,
}


def mutate_model(src: Path, kind: str, seed: int) -> tuple[bytes, str]:
    """The mutant of the ONNX file `src` for fault `kind` and `seed`."""
    m = onnx.load(str(src))
    return MODEL_MUTATORS[kind](m, np.random.default_rng(seed))


# -- artifacts -----------------------------------------------------------------------------

def _manifest(art: Path) -> dict:
    return json.loads((art / "manifest.json").read_text())


def _write_manifest(art: Path, manifest: dict) -> None:
    (art / "manifest.json").write_text(json.dumps(manifest, indent=2))


def truncate_params(art: Path, rng: Rng, other: Path) -> str:
    p = art / "params.safetensors"
    data = p.read_bytes()
    keep = int(rng.integers(0, len(data)))
    p.write_bytes(data[:keep])
    return f"params cut to {keep} of {len(data)} bytes"


def foreign_params(art: Path, rng: Rng, other: Path) -> str:
    shutil.copyfile(other / "params.safetensors", art / "params.safetensors")
    return f"params of {other.name}"


def flip_artifact_bytes(art: Path, rng: Rng, other: Path) -> str:
    name = _pick(rng, sorted(_manifest(art)["files"]))
    p = art / name
    data = bytearray(p.read_bytes())
    i = int(rng.integers(len(data)))
    data[i] ^= 1 << int(rng.integers(8))
    p.write_bytes(bytes(data))
    return f"a bit flipped in {name} at {i}"


def edit_manifest_shape(art: Path, rng: Rng, other: Path) -> str:
    man = _manifest(art)
    p = _pick(rng, [p for p in man["params"] if p["shape"]])
    j = int(rng.integers(len(p["shape"])))
    p["shape"][j] += 1
    _write_manifest(art, man)
    return f"manifest: parameter {p['name']} shape -> {p['shape']}"


def remove_file(art: Path, rng: Rng, other: Path) -> str:
    name = _pick(rng, sorted(_manifest(art)["files"]))
    (art / name).unlink()
    return f"{name} removed"


def corrupt_manifest(art: Path, rng: Rng, other: Path) -> str:
    man = _manifest(art)
    how = _pick(rng, ("cut", "version", "capacity", "signature", "architecture"))
    if how == "cut":
        text = (art / "manifest.json").read_text()
        (art / "manifest.json").write_text(text[: int(rng.integers(len(text)))])
        return "manifest cut short"
    if how == "version":
        man["format_version"] = 99
    elif how == "capacity":
        man["kv_cache"]["capacity"] = int(_pick(rng, (-1, 0, 2**40)))
    elif how == "signature":
        man["signature"]["inputs"] = []
    else:
        man["architecture"]["vocab"] = int(_pick(rng, (0, 1, -5)))
    _write_manifest(art, man)
    return f"manifest {how} edited"


#: fault kind -> mutator of a compiled artifact (in place; `other`: another artifact)
ARTIFACT_MUTATORS: dict[str, Callable[[Path, Rng, Path], str]] = {
    "truncate_params": truncate_params,
    "foreign_params": foreign_params,
    "flip_artifact_bytes": flip_artifact_bytes,
    "edit_manifest_shape": edit_manifest_shape,
    "remove_file": remove_file,
    "corrupt_manifest": corrupt_manifest,
}
