"""The ONNX frontend: symbols, params, attributes, ordering, and interpreter == onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.compiler import interpreter
from kiln.compiler.frontend.feeds import make_feeds
from kiln.compiler.frontend.onnx import load_onnx, load_onnx_model
from kiln.compiler.frontend.onnxruntime_ref import model_io, run_onnxruntime
from kiln.compiler.ir import DType, ExternalData, Inline, sym
from tests.compiler.onnx_builders import F32, init, mlp, model, tensor
from tests.helpers import assert_close

I64 = TensorProto.INT64
DATA = Path(__file__).resolve().parents[1] / "data"


def _compare(tmp_path: Path, m: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path))
    want = run_onnxruntime(path, feeds, threads=1)
    got = interpreter.run(load_onnx(path), feeds)
    for name, ref in want.items():
        assert_close(got[name], ref, name=name)


# --- symbolic dims -------------------------------------------------------------------------


def _decoder_io(ids: list, past: list, mask: list) -> onnx.ModelProto:
    inputs = [tensor("input_ids", I64, ids), tensor("attention_mask", I64, mask),
              tensor("past_key_values.0.key", F32, past)]
    nodes = [helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])]
    return model(nodes, inputs, [tensor("present.0.key", F32, None)])


def test_optimum_dim_names_map_to_batch_seq_past():
    m = _decoder_io(["batch_size", "sequence_length"], ["batch_size", 2, "past_sequence_length", 8],
                    ["batch_size", "past_sequence_length + sequence_length"])
    g = load_onnx_model(m, path_hint="optimum.onnx", infer_shapes=False)
    b, s, p = sym("batch"), sym("seq"), sym("past")
    assert g.types["input_ids"].shape == (b, s)
    assert g.types["past_key_values.0.key"].shape == (b, 2, p, 8)
    assert g.types["attention_mask"].shape == (b, p + s)
    assert g.meta["dim_names"]["past_sequence_length"] == "past"


def test_dynamo_dim_names_map_by_substitution():
    m = _decoder_io(["s0", "s1"], ["s0", 2, "s2", 8], ["s0", "s1 + s2"])
    g = load_onnx_model(m, path_hint="dynamo.onnx", infer_shapes=False)
    assert g.types["attention_mask"].shape == (sym("batch"), sym("past") + sym("seq"))


def test_unknown_and_unnamed_dims():
    vi = tensor("x", F32, ["my dim.0", None, "N"])
    m = model([helper.make_node("Identity", ["x"], ["y"])], [vi], [tensor("y", F32, [None])])
    g = load_onnx_model(m, path_hint="m.onnx", infer_shapes=False)
    d0, d1, d2 = g.types["x"].shape
    assert d0 == sym("my_dim_0") and d2 == sym("N")
    assert d1.is_Symbol and d1 != g.types["y"].shape[0]  # fresh symbols are distinct


# --- params, attributes, naming, ordering ----------------------------------------------------


def test_external_data_is_mapped_lazily(tmp_path, rng):
    m = mlp(rng)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    g = load_onnx(path)
    src = g.params["W"].source
    assert isinstance(src, ExternalData) and src.path == str(tmp_path / "weights.bin")
    assert src.dtype is DType.f32 and src.shape == (4, 3)
    np.testing.assert_array_equal(g.params["W"].load(), w)


def test_constants_become_params():
    nodes = [helper.make_node("Constant", [], ["c1"], value_float=2.5),
             helper.make_node("Constant", [], ["c2"], value_ints=[1, 2]),
             helper.make_node("Constant", [], ["c3"], value=init("t", np.eye(2, dtype=np.float32))),
             helper.make_node("Identity", ["c3"], ["y"])]
    g = load_onnx_model(model(nodes, [], [tensor("y", F32, [2, 2])]), infer_shapes=False)
    assert [n.op for n in g.nodes] == ["Identity"]
    assert g.params["c1"].load().dtype == np.float32 and g.params["c1"].type.shape == ()
    np.testing.assert_array_equal(g.params["c2"].load(), [1, 2])
    assert isinstance(g.params["c3"].source, Inline) and g.types["c3"].shape == (2, 2)


def test_attributes_are_converted_without_defaults():
    value = helper.make_tensor("v", TensorProto.INT64, [1], [7])
    nodes = [helper.make_node("Cast", ["x"], ["c"], to=TensorProto.FLOAT16),
             helper.make_node("ConstantOfShape", ["s"], ["z"], value=value),
             helper.make_node("Gelu", ["x"], ["g"], approximate="tanh"),
             helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
             helper.make_node("Clip", ["x", "", "hi"], ["clipped"]),
             helper.make_node("Softmax", ["x"], ["sm"])]
    inputs = [tensor("x", F32, [2, 3]), tensor("s", I64, [2]), tensor("hi", F32, [])]
    outs = [tensor(n, F32, None) for n in ("c", "z", "g", "t", "clipped", "sm")]
    g = load_onnx_model(model(nodes, inputs, outs, opset=20), infer_shapes=False)
    by_op = {n.op: n for n in g.nodes}
    assert by_op["Cast"].attrs["to"] is DType.f16
    assert dict(by_op["ConstantOfShape"].attrs) == {"value": 7, "dtype": DType.i64}
    assert by_op["Gelu"].attrs["approximate"] == "tanh"
    assert by_op["Transpose"].attrs["perm"] == (1, 0)
    assert by_op["Clip"].inputs == ("x", "", "hi")
    assert len(by_op["Softmax"].attrs) == 0  # axis default left to the kernel


def test_names_unique_and_nodes_sorted():
    nodes = [helper.make_node("Relu", ["a"], ["y"], name="n"),
             helper.make_node("Neg", ["x"], ["a"], name="n"),
             helper.make_node("Abs", ["x"], ["unused"])]
    g = load_onnx_model(model(nodes, [tensor("x", F32, [2])], [tensor("y", F32, [2])]),
                        path_hint="m.onnx", infer_shapes=False)
    assert [n.op for n in g.nodes] == ["Neg", "Relu", "Abs"]
    assert sorted(n.name for n in g.nodes) == ["Abs_2", "n", "n_1"]


def test_meta():
    g = load_onnx_model(mlp(np.random.default_rng(0)), path_hint="mlp.onnx")
    assert g.meta["opset"] == 18 and g.meta["producer_name"] == "kiln-tests"
    assert g.meta["onnx_inputs"] == ("x",) and g.meta["onnx_outputs"] == ("y",)
    assert g.meta["ir_version"] == 9 and g.meta["model_path"].endswith("mlp.onnx")


def test_initializer_listed_as_input_is_a_param(rng):
    m = mlp(rng)
    m.graph.input.append(tensor("W", F32, [4, 3]))
    g = load_onnx_model(m, infer_shapes=False)
    assert g.inputs == ("x",) and "W" in g.params


def test_local_functions_are_inlined(tmp_path, rng):
    fn = helper.make_function("local", "Double", ["a"], ["b"],
                              [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 18)])
    nodes = [helper.make_node("Double", ["x"], ["y"], name="dbl", domain="local")]
    m = model(nodes, [tensor("x", F32, ["n"])], [tensor("y", F32, ["n"])])
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(fn)
    g = load_onnx_model(m)
    assert [n.op for n in g.nodes] == ["Add"]
    _compare(tmp_path, m, {"x": rng.standard_normal(3).astype(np.float32)})


# --- interpreter vs onnxruntime --------------------------------------------------------------


def test_mlp_matches_onnxruntime(tmp_path, rng):
    _compare(tmp_path, mlp(rng), {"x": rng.standard_normal((5, 4)).astype(np.float32)})


def test_attention_block_matches_onnxruntime(tmp_path, rng):
    """Reshape/Transpose/MatMul/Softmax/LayerNormalization over symbolic batch and seq."""
    heads, dim = 2, 8
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1,
                         epsilon=1e-5),
        helper.make_node("Reshape", ["n", "split_shape"], ["h"]),
        helper.make_node("Transpose", ["h"], ["q"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["h"], ["kT"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["q", "kT"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "q"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["y"]),
    ]
    inits = [init("gamma", rng.standard_normal(heads * dim).astype(np.float32)),
             init("beta", rng.standard_normal(heads * dim).astype(np.float32)),
             init("split_shape", np.array([0, 0, heads, dim], np.int64)),
             init("merge_shape", np.array([0, 0, heads * dim], np.int64)),
             init("scale", np.array(dim ** -0.5, np.float32))]
    m = model(nodes, [tensor("x", F32, ["batch", "seq", heads * dim])],
              [tensor("y", F32, ["batch", "seq", heads * dim])], inits)
    _compare(tmp_path, m, {"x": rng.standard_normal((2, 5, heads * dim)).astype(np.float32)})


def test_gather_cast_where_matches_onnxruntime(tmp_path, rng):
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
             helper.make_node("Cast", ["mask"], ["maskb"], to=TensorProto.BOOL),
             helper.make_node("Unsqueeze", ["maskb", "axes"], ["mask3"]),
             helper.make_node("Where", ["mask3", "emb", "fill"], ["y"])]
    inits = [init("table", rng.standard_normal((11, 6)).astype(np.float32)),
             init("axes", np.array([-1], np.int64)), init("fill", np.array(-1.0, np.float32))]
    m = model(nodes, [tensor("ids", I64, ["batch", "seq"]), tensor("mask", I64, ["batch", "seq"])],
              [tensor("y", F32, ["batch", "seq", 6])], inits)
    feeds = {"ids": rng.integers(0, 11, (2, 4)), "mask": rng.integers(0, 2, (2, 4))}
    _compare(tmp_path, m, feeds)


# --- feeds and the reference ------------------------------------------------------------------


def test_make_feeds_for_prefill_and_decode(rng):
    m = _decoder_io(["batch_size", "sequence_length"], ["batch_size", 2, "past_sequence_length", 8],
                    ["batch_size", "past_sequence_length + sequence_length"])
    m.graph.input.append(tensor("position_ids", I64, ["batch_size", "sequence_length"]))
    g = load_onnx_model(m, infer_shapes=False)
    feeds = make_feeds(g, batch=2, seq=1, past=5, rng=rng, vocab=50)
    assert feeds["input_ids"].shape == (2, 1) and feeds["input_ids"].max() < 50
    assert feeds["attention_mask"].shape == (2, 6) and (feeds["attention_mask"] == 1).all()
    assert (feeds["position_ids"] == 5).all()
    assert feeds["past_key_values.0.key"].shape == (2, 2, 5, 8)
    prefill = make_feeds(g, batch=1, seq=7, past=0, rng=rng, vocab=50)
    assert prefill["past_key_values.0.key"].shape == (1, 2, 0, 8)
    np.testing.assert_array_equal(prefill["position_ids"], [np.arange(7)])


def test_model_io_lists_dim_names(tmp_path):
    m = _decoder_io(["batch_size", "sequence_length"], ["batch_size", 2, "past_len", 8],
                    ["batch_size", "past_len + sequence_length"])
    path = tmp_path / "io.onnx"
    onnx.save_model(m, str(path))
    inputs, _ = model_io(path)
    assert inputs[0].name == "input_ids" and inputs[0].dims == ("batch_size", "sequence_length")


# --- exported fixtures (tests/data, written by the models work) -------------------------------

FIXTURES = sorted(DATA.glob("**/*.onnx")) if DATA.exists() else []


@pytest.mark.parametrize("path", FIXTURES, ids=[p.parent.name + "/" + p.name for p in FIXTURES])
@pytest.mark.parametrize(("seq", "past"), [(7, 0), (1, 5)], ids=["prefill7", "decode_past5"])
def test_exported_fixture_matches_onnxruntime(path, seq, past, rng):
    g = load_onnx(path)
    feeds = make_feeds(g, batch=2, seq=seq, past=past, rng=rng, vocab=32)
    want = run_onnxruntime(path, feeds, threads=1)
    got = interpreter.run(g, feeds)
    for name in g.outputs:
        assert_close(got[name], want[name], rtol=1e-3, atol=1e-4, name=name)


@pytest.mark.skipif(not (DATA / "llama-dynamo.onnx").exists(), reason="fixture not exported")
def test_fixture_with_external_data_matches_onnxruntime(tmp_path, rng):
    m = onnx.load(str(DATA / "llama-dynamo.onnx"))
    path = tmp_path / "model.onnx"
    onnx.save_model(m, str(path), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    g = load_onnx(path)
    assert any(isinstance(p.source, ExternalData) for p in g.params.values())
    feeds = make_feeds(g, batch=2, seq=1, past=5, rng=rng, vocab=32)
    want = run_onnxruntime(path, feeds, threads=1)
    got = interpreter.run(g, feeds)
    assert_close(got["logits"], want["logits"], rtol=1e-3, atol=1e-4, name="logits")
