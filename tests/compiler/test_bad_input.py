"""Bad ONNX input: each case gives one KilnError line naming the file and the culprit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from kiln.compiler.errors import KilnError, UnsupportedOps
from kiln.compiler.frontend.onnx import load_onnx
from kiln.compiler.ir import ExternalData
from tests.compiler.onnx_builders import F32, init, mlp, model, tensor


def _error(path: Path, **kw) -> str:
    with pytest.raises(KilnError) as e:
        load_onnx(path, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(path)), msg
    return msg


def _save(tmp_path: Path, m: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(m.SerializeToString())
    return path


def test_garbage_bytes(tmp_path, rng):
    path = tmp_path / "model.onnx"
    path.write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert "not a valid ONNX model" in _error(path)


def test_truncated_file(tmp_path, rng):
    data = mlp(rng).SerializeToString()
    path = tmp_path / "model.onnx"
    path.write_bytes(data[: len(data) // 2])
    assert "truncated or corrupt" in _error(path)


def test_empty_file_and_directory(tmp_path):
    (tmp_path / "empty.onnx").write_bytes(b"")
    assert "empty file" in _error(tmp_path / "empty.onnx")
    (tmp_path / "dir.onnx").mkdir()
    assert "not a file" in _error(tmp_path / "dir.onnx")
    assert "no such file" in _error(tmp_path / "absent.onnx")


def _external_model(tmp_path: Path, rng: np.random.Generator) -> Path:
    m = mlp(rng)
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    return path


def test_missing_external_data_file(tmp_path, rng):
    path = _external_model(tmp_path, rng)
    (tmp_path / "weights.bin").unlink()
    msg = _error(path)
    assert "weights.bin" in msg and "missing" in msg


def test_missing_external_data_is_optional_for_shapes(tmp_path, rng):
    path = _external_model(tmp_path, rng)
    (tmp_path / "weights.bin").unlink()
    g = load_onnx(path, weights_optional=True)
    src = g.params["W"].source
    assert isinstance(src, ExternalData) and not src.available
    assert g.params["W"].type.shape == (4, 3)


def test_short_external_data_file(tmp_path, rng):
    path = _external_model(tmp_path, rng)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 8)
    msg = _error(path)
    assert "weights.bin" in msg and "needs bytes" in msg


def test_cyclic_graph(tmp_path):
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="loop_back"),
             helper.make_node("Relu", ["a"], ["y"], name="out")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [2])], [tensor("y", F32, [2])]))
    msg = _error(path)
    assert "cycle" in msg and ("first" in msg or "loop_back" in msg)


def test_dangling_input(tmp_path):
    nodes = [helper.make_node("Add", ["x", "nowhere"], ["y"], name="adder")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [2])], [tensor("y", F32, [2])]))
    msg = _error(path)
    assert "adder" in msg and "nowhere" in msg and "dangling" in msg


def test_two_unsupported_ops_give_two_lines(tmp_path):
    nodes = [helper.make_node("KilnNoSuchOpA", ["x"], ["a"], name="a1"),
             helper.make_node("KilnNoSuchOpA", ["a"], ["b"], name="a2"),
             helper.make_node("KilnNoSuchOpB", ["b"], ["y"], name="b1")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [2])], [tensor("y", F32, [2])]))
    with pytest.raises(UnsupportedOps) as e:
        load_onnx(path)
    assert e.value.ops == {"KilnNoSuchOpA": (2, "a1"), "KilnNoSuchOpB": (1, "b1")}
    assert len(e.value.lines) == 2
    assert all(line.startswith(str(path)) and "\n" not in line for line in e.value.lines)
    assert "KilnNoSuchOpA (2 nodes, first: a1)" in e.value.lines[0]
    assert "KilnNoSuchOpB (1 node, first: b1)" in e.value.lines[1]


def test_contradictory_declared_output_shape(tmp_path):
    nodes = [helper.make_node("Add", ["x", "x"], ["y"], name="doubler")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [2, 3])], [tensor("y", F32, [2, 5])]))
    msg = _error(path)
    assert "doubler" in msg and "y" in msg


def test_contradictory_value_info(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "x"], ["h"], name="square"),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [3, 3])], [tensor("y", F32, None)],
                                 value_info=[tensor("h", F32, [3, 4])]))
    msg = _error(path)
    assert "square" in msg and "h" in msg


def test_impossible_input_shape(tmp_path):
    vi = tensor("x", F32, [2, 3])
    vi.type.tensor_type.shape.dim[1].dim_value = -3
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path = _save(tmp_path, model(nodes, [vi], [tensor("y", F32, None)]))
    msg = _error(path)
    assert "x" in msg and "-3" in msg


@pytest.mark.parametrize("opset", [11, 30])
def test_unsupported_opset(tmp_path, opset):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [2])], [tensor("y", F32, [2])],
                                 opset=opset))
    msg = _error(path)
    assert f"opset {opset}" in msg and "13-23" in msg


def test_unsupported_domain(tmp_path):
    node = helper.make_node("LabelEncoder", ["x"], ["y"], name="enc", domain="ai.onnx.ml")
    path = _save(tmp_path, model([node], [tensor("x", F32, [2])], [tensor("y", F32, [2])]))
    msg = _error(path)
    assert "enc" in msg and "ai.onnx.ml" in msg


def test_sparse_constant(tmp_path):
    values = init("v", np.ones(2, np.float32))
    indices = init("i", np.array([0, 3], np.int64))
    sparse = helper.make_sparse_tensor(values, indices, [4])
    nodes = [helper.make_node("Constant", [], ["c"], name="sparse_c", sparse_value=sparse),
             helper.make_node("Add", ["x", "c"], ["y"], name="add")]
    path = _save(tmp_path, model(nodes, [tensor("x", F32, [4])], [tensor("y", F32, [4])]))
    msg = _error(path)
    assert "sparse_c" in msg and "sparse" in msg


def test_unsupported_element_type(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    path = _save(tmp_path, model(nodes, [tensor("x", onnx.TensorProto.STRING, [2])],
                                 [tensor("y", F32, [2])]))
    msg = _error(path)
    assert "x" in msg and "STRING" in msg


def test_empty_input_loads_but_does_not_compile(tmp_path):
    """A static dim of 0 is a legal (empty) ONNX tensor, so import and the interpreter take it
    (ONNX's CastLike and Split conformance tests use one); a decoder input declaring it is a
    mis-edited export that compile refuses in one line before building anything."""
    from kiln.compiler.compile import compile_model
    from tests.fuzz.harness import FIXTURES

    m = onnx.load(FIXTURES[0])
    mask = next(vi for vi in m.graph.input if vi.name == "attention_mask")
    mask.type.tensor_type.shape.dim[1].dim_value = 0
    path = _save(tmp_path, m)
    assert "attention_mask" in load_onnx(path).inputs
    with pytest.raises(KilnError) as e:
        compile_model(path, tmp_path / "art", max_seq=64)
    msg = str(e.value)
    assert "\n" not in msg and "attention_mask" in msg and "[batch, 0]" in msg, msg
    assert not (tmp_path / "art").exists()
