"""fold_constants: Before/Expected graphs, and interpreter(fold(g)) == interpreter(g)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.interpreter import run
from kiln.compiler.ir import Derived, DType, Graph, Inline, sym
from kiln.compiler.verify import verify
from kiln.passes.eliminate_dead_code import eliminate_dead_code
from kiln.passes.fold_constants import fold_constants
from tests.helpers import assert_close
from tests.passes.builder import GraphBuilder

B, S = sym("batch"), sym("seq")
DATA = Path(__file__).parents[1] / "data"


def same_results(g: Graph, h: Graph, rng: np.random.Generator, **dims: int) -> None:
    verify(h)
    feeds = {}
    for v in g.inputs:
        shape = tuple(d if isinstance(d, int) else int(d.subs({sym(k): n for k, n in
                                                                dims.items()}))
                      for d in g.types[v].shape)
        feeds[v] = rng.uniform(0.5, 2.0, shape).astype(g.types[v].dtype.numpy)
    want, got = run(g, feeds), run(h, feeds)
    for k in g.outputs:
        assert_close(got[k], want[k], name=k)


def ops(g: Graph) -> list[tuple[str, dict]]:
    return [(n.op, dict(n.attrs)) for n in g.nodes]


def test_shape_chain_folds_to_static_symbolic_reshape(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", "seq", 64))
    seq = b.op("Gather", b.op("Shape", x), b.const(1, np.int64), axis=0)
    target = b.op("Concat", b.ints(0), b.op("Unsqueeze", seq, b.ints(0)), b.ints(4, -1), axis=0)
    g = b.build(b.op("Reshape", x, target))
    h = eliminate_dead_code(fold_constants(g))
    assert ops(h) == [("Reshape", {"shape": (B, S, 4, 16)})]
    assert h.types[h.outputs[0]].shape == (B, S, 4, 16)
    same_results(g, h, rng, batch=2, seq=3)


def test_mask_subgraph_shrinks(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", "seq", "seq"))
    n = b.op("Gather", b.op("Shape", x), b.const(1, np.int64), axis=0)
    pos = b.op("Range", b.const(0, np.int64), n, b.const(1, np.int64))
    causal = b.op("LessOrEqual", b.op("Unsqueeze", pos, b.ints(0)),
                  b.op("Unsqueeze", pos, b.ints(1)))
    ones = b.op("ConstantOfShape", b.op("Shape", causal), value=1.0, dtype=DType.f32)
    mask = b.op("Where", b.const(True, np.bool_), causal, b.const(False, np.bool_))
    picked = b.op("Mul", b.op("Where", mask, ones, b.const(-1e9)), b.const([1.0] * 1))
    g = b.build(b.op("Add", x, b.op("Expand", picked, b.op("Shape", picked))))
    h = eliminate_dead_code(fold_constants(g))
    assert [op for op, _ in ops(h)] == ["Range", "Unsqueeze", "Unsqueeze", "LessOrEqual",
                                        "ConstantOfShape", "Where", "Add"]
    assert ops(h)[0][1] == {"start": 0, "limit": S, "delta": 1, "dtype": DType.i64}
    assert ops(h)[4][1] == {"shape": (S, S), "value": 1.0, "dtype": DType.f32}
    same_results(g, h, rng, batch=2, seq=4)


def test_static_attribute_forms(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", 6, 8))
    dims = b.op("Shape", x)
    sliced = b.op("Slice", x, b.ints(1), b.op("Gather", dims, b.ints(1), axis=0), b.ints(1))
    tiled = b.op("Tile", sliced, b.op("Concat", b.ints(1, 1), b.ints(2), axis=0))
    reduced = b.op("ReduceSum", tiled, b.ints(-1), keepdims=1)
    squeezed = b.op("Squeeze", reduced, b.ints(2))
    parts = b.op("Split", squeezed, b.ints(2, 3), axis=1, outputs=2)
    padded = b.op("Pad", parts[0], b.ints(0, 1, 0, 2), b.const(0.5))
    g = b.build(padded, parts[1])
    h = eliminate_dead_code(fold_constants(g))
    got = dict(ops(h))
    assert got["Slice"] == {"starts": (1,), "ends": (6,), "axes": (1,), "steps": (1,)}
    assert got["Tile"] == {"repeats": (1, 1, 2)}
    assert got["ReduceSum"] == {"axes": (-1,), "keepdims": 1}
    assert got["Squeeze"] == {"axes": (2,)}
    assert got["Split"] == {"axis": 1, "split": (2, 3)}
    assert got["Pad"] == {"pads": (0, 1, 0, 2), "value": 0.5}
    assert all(not n.inputs[1:] for n in h.nodes)
    same_results(g, h, rng, batch=3)


def test_constants_fold_to_params_and_large_weights_stay_lazy(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", 300))
    w = b.const(rng.uniform(-1, 1, (300, 300)))
    scale = b.op("Cast", b.op("Add", b.ints(1), b.ints(2)), to=DType.f32)
    y = b.op("MatMul", x, b.op("Transpose", w, perm=(1, 0)))
    g = b.build(b.op("Mul", b.op("Identity", y), scale))
    h = eliminate_dead_code(fold_constants(g, max_float_elements=1000))
    assert [op for op, _ in ops(h)] == ["MatMul", "Mul"]
    mm, mul = h.nodes
    assert isinstance(h.params[mm.inputs[1]].source, Derived)
    assert isinstance(h.params[mul.inputs[1]].source, Inline)
    assert h.params[mul.inputs[1]].load().tolist() == [3.0]
    same_results(g, h, rng, batch=2)


def test_neutral_ops_and_same_shape_forward(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", 4))
    y = b.op("Mul", x, b.const([1.0, 1.0, 1.0, 1.0]))
    y = b.op("Add", b.const([0.0]), y)
    y = b.op("Expand", y, b.op("Shape", x))
    y = b.op("Reshape", y, b.op("Shape", x))
    y = b.op("Cast", b.op("Dropout", y), to=DType.f32)
    g = b.build(b.op("Sub", y, b.const(0.5)))
    h = eliminate_dead_code(fold_constants(g))
    assert [op for op, _ in ops(h)] == ["Sub"] and h.nodes[0].inputs[0] == "x"
    same_results(g, h, rng, batch=2)


@pytest.mark.parametrize("name", ["llama-optimum", "gpt2-optimum", "qwen2-dynamo"])
def test_real_exports_shrink_and_agree(name, rng):
    from kiln.compiler.frontend.onnx import load_onnx

    g = load_onnx(DATA / f"{name}.onnx")
    h = eliminate_dead_code(fold_constants(g))
    assert len(h.nodes) < 0.8 * len(g.nodes)
    assert h.op_histogram().get("Shape", 0) < g.op_histogram()["Shape"] // 2
    verify(h)
    for past, seq in ((0, 5), (3, 1)):
        feeds = {v: _feed(v, g.types[v], rng, past=past, seq=seq) for v in g.inputs}
        want, got = run(g, feeds), run(h, feeds)
        for k in g.outputs:
            assert_close(got[k], want[k], name=k)


def _feed(name, t, rng, *, past, seq):
    dims = {"batch": 2, "seq": seq, "past": past}
    shape = tuple(d if isinstance(d, int) else int(d.subs({sym(k): n for k, n in dims.items()}))
                  for d in t.shape)
    if name == "input_ids":
        return rng.integers(1, 256, shape)
    if "mask" in name:
        return np.ones(shape, t.dtype.numpy)
    if t.dtype.is_int:
        return np.broadcast_to(np.arange(past, past + seq), shape).astype(t.dtype.numpy)
    return rng.standard_normal(shape).astype(t.dtype.numpy)
