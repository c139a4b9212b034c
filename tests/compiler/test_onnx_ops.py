"""ONNX-level kernels against onnxruntime on single-node models, and on symbolic shape values."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.compiler.interpreter import KERNELS, run_node
from kiln.compiler.interpreter.onnx_ops import erf
from kiln.compiler.ir import DType, Node, sym
from tests.helpers import assert_close

SEED = np.random.default_rng(7)


def rand(*shape, dtype=np.float32, lo=-2.0, hi=2.0):
    """Seeded random data, never exactly zero."""
    x = SEED.uniform(lo, hi, size=shape)
    x = np.where(np.abs(x) < 1e-3, 0.5, x)
    return x.astype(dtype)


def ints(*values):
    return np.array(values, dtype=np.int64)


def run_ort(op, inputs, attrs, n_out, opset, domain=""):
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, domain=domain, **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype),
                                                  x.shape) for n, x in zip(names, inputs,
                                                                           strict=True) if n]
    graph = helper.make_graph([node], "g", graph_inputs,
                              [onnx.ValueInfoProto(name=o) for o in outs])
    opsets = [helper.make_opsetid("", opset)]
    if domain:
        opsets.append(helper.make_opsetid(domain, 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {n: x for n, x in zip(names, inputs, strict=True) if n})


def to_kiln_attrs(attrs):
    """The frontend's attribute conventions: lists -> tuples, dtype enums -> DType."""
    out = {}
    for k, v in attrs.items():
        if k == "to":
            v = DType.of(helper.tensor_dtype_to_np_dtype(v))
        if isinstance(v, onnx.TensorProto):  # ConstantOfShape's value
            arr = onnx.numpy_helper.to_array(v)
            out["dtype"], v = DType.of(arr.dtype), arr.item()
        out[k] = tuple(v) if isinstance(v, list) else v
    return out


def check(op, inputs, attrs=None, *, n_out=1, opset=18, domain="", rtol=None, atol=None):
    attrs = attrs or {}
    want = run_ort(op, inputs, attrs, n_out, opset, domain)
    name = f"{domain}.{op}" if domain else op
    node = Node(name, tuple(f"in{i}" if x is not None else "" for i, x in enumerate(inputs)),
                tuple(f"out{i}" for i in range(n_out)), to_kiln_attrs(attrs), name="n")
    got = run_node(node, list(inputs))
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g.dtype == w.dtype, f"{op} output {i}: dtype {g.dtype} != {w.dtype}"
        assert_close(g, w, rtol=rtol, atol=atol, name=f"{op} output {i}")


UNARY = ["Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Relu",
         "Cos", "Sin", "Floor", "Ceil", "Sign", "Softplus", "Round"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    x = rand(3, 5, lo=0.1) if op in ("Sqrt", "Log") else rand(3, 5, lo=-4, hi=4)
    check(op, [x])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Pow", "Min", "Max"])
def test_binary_float(op):
    a = rand(2, 3, 4, lo=0.5) if op == "Pow" else rand(2, 3, 4)
    check(op, [a, rand(3, 1)])


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Min", "Max"])
def test_binary_int(op):
    a = SEED.integers(-20, 20, size=(4, 5)).astype(np.int64)
    b = SEED.integers(1, 7, size=(5,)).astype(np.int64) * np.array([1, -1, 1, -1, 1])
    check(op, [a, b])


@pytest.mark.parametrize("fmod", [0, 1])
def test_mod(fmod):
    a = SEED.integers(-20, 20, size=(6,)).astype(np.int64)
    check("Mod", [a, ints(3, -4, 5, 3, -2, 7)], {"fmod": fmod})


@pytest.mark.parametrize("op", ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"])
def test_compare(op):
    a = SEED.integers(0, 3, size=(3, 4)).astype(np.int64)
    check(op, [a, SEED.integers(0, 3, size=(4,)).astype(np.int64)])


@pytest.mark.parametrize("op", ["And", "Or", "Xor"])
def test_logical(op):
    check(op, [rand(3, 4) > 0, rand(4) > 0])


def test_not_isnan_isinf_where():
    x = rand(4, 5)
    x[0, 0], x[1, 1], x[2, 2] = np.nan, np.inf, -np.inf
    check("Not", [x > 0])
    check("IsNaN", [x])
    check("IsInf", [x], {"detect_negative": 0})
    check("Where", [rand(4, 1) > 0, rand(4, 5), rand(5)])


def test_erf_accuracy():
    import math

    x = np.linspace(-6, 6, 10001)
    want = np.array([math.erf(v) for v in x])
    assert np.abs(erf(x) - want).max() < 1e-12
    assert erf(x.astype(np.float32)).dtype == np.float32


def test_matmul_gemm_einsum():
    check("MatMul", [rand(2, 3, 4, 5), rand(5, 6)])
    check("MatMul", [rand(5), rand(2, 5, 3)])
    check("Gemm", [rand(4, 3), rand(5, 4), rand(5)], {"transA": 1, "transB": 1, "alpha": 0.5,
                                                      "beta": 2.0})
    check("Einsum", [rand(2, 3, 4), rand(2, 4, 5)], {"equation": "bij, bjk -> bik"})


def test_cast():
    x = rand(3, 4, lo=-9, hi=9)
    check("Cast", [x], {"to": TensorProto.INT64})
    check("Cast", [x], {"to": TensorProto.FLOAT16}, atol=1e-2)
    check("Cast", [x], {"to": TensorProto.BOOL})
    check("CastLike", [x, ints(1)])


def test_layout_ops():
    x = rand(2, 3, 4)
    check("Reshape", [x, ints(0, -1)])
    check("Reshape", [x, ints(4, 0, 2)], {"allowzero": 0})
    check("Flatten", [x], {"axis": 2})
    check("Squeeze", [rand(2, 1, 3, 1), ints(-1)])
    check("Squeeze", [rand(2, 1, 3, 1)])
    check("Unsqueeze", [x, ints(0, -1)])
    check("Squeeze", [rand(2, 1, 3)], {"axes": [1]}, opset=11)
    check("Unsqueeze", [x], {"axes": [1, 4]}, opset=11)
    check("Transpose", [x], {"perm": [2, 0, 1]})
    check("Transpose", [x])
    check("Expand", [rand(3, 1), ints(2, 1, 4)])
    check("Concat", [x, rand(2, 2, 4)], {"axis": -2})
    check("Tile", [x, ints(1, 2, 3)])
    check("Identity", [x])


def test_split():
    x = rand(6, 5)
    check("Split", [x, ints(2, 4)], n_out=2)
    check("Split", [x], {"axis": 1, "num_outputs": 2}, n_out=2)
    check("Split", [x], {"axis": 0, "split": [1, 5]}, n_out=2, opset=11)


@pytest.mark.parametrize("spec", [
    ([1], [4], None, None), ([-3, 0], [1000, 2], [0, 1], [1, 1]),
    ([-1], [-1000], [1], [-2]), ([9], [-9], [0], [-1]), ([0, 1], [-1, 3], [-1, 0], [2, 1]),
])
def test_slice(spec):
    starts, ends, axes, steps = spec
    inputs = [rand(5, 6), ints(*starts), ints(*ends)]
    inputs += [ints(*axes) if axes else None, ints(*steps) if steps else None]
    check("Slice", inputs)


def test_gather_scatter():
    x = rand(4, 5)
    check("Gather", [x, ints(-1, 0, 2)], {"axis": 1})
    check("Gather", [x, np.array(-2, dtype=np.int64)])
    check("GatherElements", [x, SEED.integers(-5, 5, size=(4, 2)).astype(np.int64)],
          {"axis": 1})
    check("GatherND", [rand(2, 3, 4), np.array([[[1], [0]], [[2], [1]]], np.int64)],
          {"batch_dims": 1})
    check("ScatterND", [x, np.array([[1], [3]], np.int64), rand(2, 5)])
    check("ScatterND", [x, np.array([[1, 2], [1, 2]], np.int64), rand(2)],
          {"reduction": "add"})
    check("ScatterElements", [x, np.array([[1, -1]], np.int64), rand(1, 2)], {"axis": 1})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad(mode):
    x = rand(3, 4)
    value = np.array(1.5, np.float32) if mode == "constant" else None
    check("Pad", [x, ints(1, 2, 0, 1), value], {"mode": mode})
    check("Pad", [x, ints(1, -1), value, ints(1)], {"mode": mode})


def test_generators():
    check("Shape", [rand(2, 3, 4)], {"start": 1, "end": -1})
    check("Size", [rand(2, 3, 4)])
    check("ConstantOfShape", [ints(2, 3)],
          {"value": helper.make_tensor("v", TensorProto.INT64, [1], [7])})
    check("Range", [np.array(2, np.int64), np.array(11, np.int64), np.array(3, np.int64)])
    check("Range", [np.array(1.0, np.float32), np.array(-2.0, np.float32),
                    np.array(-0.5, np.float32)])
    check("Trilu", [rand(2, 4, 5), np.array(1, np.int64)], {"upper": 0})
    check("Trilu", [rand(4, 5)])
    check("NonZero", [rand(3, 4) > 0])
    check("Dropout", [rand(3, 4)])


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin",
                                "ReduceProd", "ReduceSumSquare", "ReduceL2"])
def test_reduce(op):
    x = rand(2, 3, 4, lo=0.5)
    check(op, [x, ints(-1, 0)], {"keepdims": 0})
    check(op, [x])
    check(op, [x, ints(1)], {"keepdims": 1}, opset=18)


def test_reduce_axes_attribute_form():
    check("ReduceMean", [rand(2, 3, 4)], {"axes": [1]}, opset=13)
    check("ReduceSum", [rand(2, 3, 4)], {"axes": [1]}, opset=11)


def test_arg_and_topk():
    x = SEED.integers(0, 4, size=(3, 5)).astype(np.float32)
    check("ArgMax", [x], {"axis": 1, "select_last_index": 1})
    check("ArgMax", [x], {"keepdims": 0})
    check("TopK", [rand(3, 6), ints(3)], n_out=2)
    check("TopK", [x, ints(2)], {"largest": 0, "axis": 0}, n_out=2)


def test_softmax_norms():
    x = rand(2, 3, 8)
    check("Softmax", [x])
    check("Softmax", [x], {"axis": 1})
    check("LogSoftmax", [x])
    check("LayerNormalization", [x, rand(8), rand(8)], {"epsilon": 1e-5}, n_out=3)
    check("LayerNormalization", [x, rand(3, 8)], {"axis": -2}, n_out=1)
    check("RMSNormalization", [x, rand(8)], {"epsilon": 1e-6}, opset=23)
    check("SimplifiedLayerNormalization", [x, rand(8)], {"epsilon": 1e-6})


def test_activations():
    x = rand(3, 8, lo=-5, hi=5)
    check("Gelu", [x], opset=20)
    check("Gelu", [x], {"approximate": "tanh"}, opset=20)
    check("Clip", [x, np.array(-1, np.float32), np.array(2, np.float32)])
    check("Clip", [x, None, np.array(2, np.float32)])
    check("HardSigmoid", [x], {"alpha": 0.3})
    check("HardSwish", [x])
    check("LeakyRelu", [x])
    check("Mish", [x], opset=18)
    check("CumSum", [x, np.array(1, np.int64)], {"exclusive": 1, "reverse": 1})
    check("CumSum", [x, np.array(-1, np.int64)])


def test_contrib_ops():
    x, b = rand(2, 3, 8), rand(8)
    check("Gelu", [x], domain="com.microsoft")
    check("BiasGelu", [x, b], domain="com.microsoft")
    check("FastGelu", [x, b], domain="com.microsoft")
    check("QuickGelu", [x], domain="com.microsoft")
    check("SkipLayerNormalization", [x, rand(2, 3, 8), rand(8), rand(8), rand(8)],
          {"epsilon": 1e-5}, domain="com.microsoft", n_out=1)
    check("SkipSimplifiedLayerNormalization", [x, rand(2, 3, 8), rand(8)],
          {"epsilon": 1e-5}, domain="com.microsoft", n_out=1)


@pytest.mark.parametrize("interleaved", [0, 1])
def test_rotary_embedding(interleaved):
    x = rand(2, 4, 3, 8)  # [b, heads, s, D]
    cos, sin = rand(10, 3), rand(10, 3)
    pos = np.array([[0, 1, 2], [5, 6, 7]], np.int64)
    check("RotaryEmbedding", [x, cos, sin, pos],
          {"interleaved": interleaved, "rotary_embedding_dim": 6}, opset=23)
    check("RotaryEmbedding", [rand(2, 3, 16), rand(2, 3, 4), rand(2, 3, 4)],
          {"interleaved": interleaved, "num_heads": 2}, opset=23)


@pytest.mark.parametrize("causal", [0, 1])
def test_attention(causal):
    b, s, past = 2, 3, 4
    q, k, v = rand(b, 4, s, 8), rand(b, 2, s, 8), rand(b, 2, s, 8)
    pk, pv = rand(b, 2, past, 8), rand(b, 2, past, 8)
    mask = rand(b, 1, s, past + s) > -1.0
    check("Attention", [q, k, v, mask, pk, pv], {"is_causal": causal}, n_out=3, opset=23)
    check("Attention", [rand(b, s, 32), rand(b, s, 16), rand(b, s, 16), rand(s, s)],
          {"q_num_heads": 4, "kv_num_heads": 2, "scale": 0.3}, opset=23)


# ---------------------------------------------------------------------------------------------
# symbolic shape arithmetic (object arrays of dims)

SEQ, PAST = sym("seq"), sym("past")


def run_sym(op, inputs, **attrs):
    node = Node(op, tuple(f"i{k}" for k in range(len(inputs))), ("o",), attrs, name="n")
    return run_node(node, inputs)[0]


def dims(*d):
    a = np.empty(len(d), dtype=object)
    a[:] = d
    return a


def test_symbolic_shape_chain():
    shape = dims(2, SEQ, 64)
    seq = run_sym("Gather", [shape, np.array(1, np.int64)], axis=0)
    assert seq.shape == () and seq.item() == SEQ
    total = run_sym("Add", [run_sym("Unsqueeze", [seq, ints(0)]), dims(PAST)])
    assert list(total) == [SEQ + PAST]
    target = run_sym("Concat", [ints(2, -1), total], axis=0)
    assert target.dtype == object and list(target) == [2, -1, SEQ + PAST]
    assert run_sym("ReduceProd", [shape], keepdims=0).item() == 128 * SEQ
    assert run_sym("Div", [dims(SEQ * 4), ints(2)])[0] == 2 * SEQ
    assert run_sym("Cast", [dims(SEQ)], to=DType.i64)[0] == SEQ


def test_symbolic_values_become_ints_when_known():
    out = run_sym("Mul", [dims(SEQ), ints(0)])
    assert out.dtype == np.int64 and out.tolist() == [0]


def test_symbolic_comparisons_decide_or_refuse():
    assert run_sym("Equal", [dims(SEQ + 1), dims(SEQ + 1)]).tolist() == [True]
    assert run_sym("Equal", [dims(SEQ + 1), ints(0)]).tolist() == [False]
    assert run_sym("Less", [dims(SEQ), dims(SEQ + 1)]).tolist() == [True]
    with pytest.raises(Exception, match="depends on symbol values"):
        run_sym("Equal", [dims(SEQ), ints(1)])
    picked = run_sym("Where", [np.array([True, False]), dims(SEQ, 1), dims(PAST, 7)])
    assert list(picked) == [SEQ, 7]
    assert list(run_sym("Max", [dims(SEQ + 1, 3), ints(1, 5)])) == [SEQ + 1, 5]


def test_folded_attribute_forms():
    x = rand(2, 6)
    assert run_sym("Reshape", [x], shape=(3, 4)).shape == (3, 4)
    assert run_sym("Expand", [rand(1, 6)], shape=(5, 6)).shape == (5, 6)
    assert run_sym("ConstantOfShape", [], shape=(2, 2), value=1, dtype=DType.i64).dtype == \
        np.int64
    assert run_sym("Range", [], start=1, limit=4, delta=1, dtype=DType.i64).tolist() == [1, 2, 3]
    assert run_sym("Slice", [x], starts=(1,), ends=(5,), axes=(1,), steps=(2,)).shape == (2, 2)
    assert run_sym("Tile", [x], repeats=(2, 1)).shape == (4, 6)
    assert run_sym("Pad", [x], pads=(0, 1, 0, 1), value=0.0).shape == (2, 8)


LISTED_OPS = (
    "Add", "Sub", "Mul", "Div", "Pow", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Tanh",
    "Sigmoid", "Erf", "Relu", "Cos", "Sin", "Floor", "Ceil", "Sign", "Min", "Max", "Mod",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Not", "Xor",
    "IsNaN", "IsInf", "Where", "MatMul", "Gemm", "Cast", "CastLike", "Reshape", "Flatten",
    "Squeeze", "Unsqueeze", "Transpose", "Expand", "Concat", "Split", "Slice", "Gather",
    "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Tile", "Pad", "Shape",
    "Size", "ConstantOfShape", "Range", "Trilu", "Identity", "Dropout", "ReduceMean",
    "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ArgMax", "Softmax", "LogSoftmax",
    "LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "Gelu", "Einsum",
    "CumSum", "TopK", "NonZero", "Clip", "HardSigmoid", "Attention", "RotaryEmbedding"
)


def test_every_listed_op_has_a_kernel():
    assert [op for op in LISTED_OPS if op not in KERNELS] == []
    assert onnx.defs.has("Attention")
