"""eliminate_common_subexpressions and eliminate_dead_code: Before/Expected and same results."""

from __future__ import annotations

import numpy as np

from kiln.compiler.interpreter import run
from kiln.compiler.ir import DType, Graph
from kiln.compiler.verify import verify
from kiln.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from kiln.passes.eliminate_dead_code import eliminate_dead_code
from tests.helpers import assert_close
from tests.passes.builder import GraphBuilder


def same_results(g: Graph, h: Graph, rng: np.random.Generator) -> None:
    verify(h)
    feeds = {"x": rng.uniform(0.5, 2.0, (2, 4)).astype(np.float32)}
    want, got = run(g, feeds), run(h, feeds)
    for k in g.outputs:
        assert_close(got[k], want[k], name=k)


def duplicated() -> Graph:
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", 4))
    a1 = b.op("Mul", x, b.const([2.0], name="two"))
    a2 = b.op("Mul", x, b.const([2.0], name="two_again"))
    e1, e2 = b.op("Exp", a1), b.op("Exp", a2)
    b.op("Tanh", b.op("Sin", x))  # dead chain
    b.const([5.0], name="unused")
    return b.build(b.op("Add", e1, e2))


def test_cse_merges_params_and_nodes(rng):
    g = duplicated()
    h = eliminate_dead_code(eliminate_common_subexpressions(g))
    assert [(n.op, n.inputs) for n in h.nodes] == [
        ("Mul", ("x", "two")), ("Exp", ("mul1",)), ("Add", ("exp3", "exp3"))]
    assert set(h.params) == {"two"}
    same_results(g, h, rng)


def test_cse_keeps_different_attributes_and_graph_outputs(rng):
    b = GraphBuilder()
    x = b.input("x", DType.f32, ("batch", 4))
    s1 = b.op("Softmax", x, axis=0)
    s2 = b.op("Softmax", x, axis=1)
    s3 = b.op("Softmax", x, axis=1)
    g = b.build(s1, s2, s3)
    h = eliminate_common_subexpressions(g)
    assert len(h.nodes) == 3
    same_results(g, h, rng)


def test_dce_drops_dead_nodes_params_and_types(rng):
    g = duplicated()
    h = eliminate_dead_code(g)
    assert [n.op for n in h.nodes] == ["Mul", "Mul", "Exp", "Exp", "Add"]
    assert set(h.params) == {"two", "two_again"}
    assert "unused" not in h.types and not any(v.startswith("tanh") for v in h.types)
    assert h.inputs == g.inputs
    same_results(g, h, rng)
