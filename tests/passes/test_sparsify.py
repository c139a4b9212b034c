"""sparsify: which linears become sparse_linear (the cost model), the rewritten graph's semantics
(interpreter before == after), int8 codes, the CUDA target's 2:4 rule, decisions made without
the weights, and replaying recorded decisions."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kiln.codegen.testing import LlamaConfig, canonical_llama_graph
from kiln.compiler.interpreter import run
from kiln.compiler.ir import Derived, DType, ExternalData, Inline
from kiln.passes.gptq import _feeds
from kiln.passes.prune_weights import parse_config, prune_weights
from kiln.passes.quantize import parse_preset, quantize_weights
from kiln.passes.sparsify import SPARSE_TARGETS, SparseTarget, sparsify
from tests.helpers import assert_close

#: every projection's N a multiple of 16 (the bitmap blocks) and K of 4 (2:4)
CFG = LlamaConfig(vocab=97, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffn=128,
                  max_pos=64)
LINEARS = 7 * CFG.layers  # q, k, v, o, gate, up, down per layer; the LM head stays dense


@pytest.fixture(scope="module")
def graph():
    return canonical_llama_graph(CFG, seed=0)


def pruned(graph, sparsity: str):
    return prune_weights(graph, config=parse_config(sparsity, "magnitude"))


def logits(graph, ids: np.ndarray) -> np.ndarray:
    return run(graph, _feeds(graph, ids), outputs=["logits"])["logits"]


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4"])
def test_pruned_linears_become_sparse_and_compute_the_same(graph, rng, sparsity):
    before = pruned(graph, sparsity)
    after = sparsify(before, target="cpu")
    hist = after.op_histogram()
    assert hist["sparse_linear"] == LINEARS and hist["linear"] == 1  # the LM head
    assert all(d["layout"] == "bitmap" and d["speedup"] >= 1.1 for d in
               after.meta["sparse"].values())
    assert all(n.attrs["layout"] == "bitmap" for n in after.nodes if n.op == "sparse_linear")
    ids = rng.integers(0, CFG.vocab, (1, 9))
    want = logits(before, ids)
    assert_close(logits(after, ids), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_dense_and_lightly_sparse_weights_stay_dense(graph):
    assert sparsify(graph, target="cpu") is graph
    light = sparsify(pruned(graph, "0.1"), target="cpu")  # 10% zeros do not pay for the bitmap
    assert "sparse_linear" not in light.op_histogram()
    assert sparsify(pruned(graph, "0.5"), target=None).op_histogram()["linear"] == LINEARS + 1


def test_pre_pruned_weights_are_found_without_a_pruning_config(graph, rng):
    """Zeros already in the weights (a pruned checkpoint): the pass reads them."""
    params = dict(graph.params)
    heavy = [n.inputs[1] for n in graph.nodes if n.op == "linear"][:3]
    for name in heavy:
        w = np.array(params[name].load())
        w[rng.random(w.shape) < 0.6] = 0
        params[name] = dataclasses.replace(params[name], source=Inline(w, computed=False))
    g = sparsify(graph.replace(params=params), target="cpu")
    assert set(g.meta["sparse"]) == set(heavy)
    assert all(abs(d["zeros"] - 0.6) < 0.05 for d in g.meta["sparse"].values())


#: a CPU whose int8 GEMVs are bound by memory, not arithmetic (this project's Zen 4 is not:
#: its int8 sparse GEMV does more arithmetic per weight than the dense one, SPARSE_TARGETS)
MEMORY_BOUND = SparseTarget("bitmap", 40e9, (("float32", 80e9, 80e9), ("int8", 80e9, 80e9)))


def test_int8_codes_become_sparse_with_row_scales(graph, rng):
    q = quantize_weights(pruned(graph, "0.5"), preset=parse_preset("w8-rtn"))
    s = sparsify(q, target=MEMORY_BOUND)
    nodes = [n for n in s.nodes if n.op == "sparse_linear"]
    assert len(nodes) == LINEARS
    for n in nodes:
        assert s.types[n.inputs[1]].dtype.value == "int8"
        assert s.types[n.inputs[3]].shape == (n.attrs["out_features"],)
    assert not any(name.endswith(".qweight") for name in s.params if name in s.meta["sparse"])
    ids = rng.integers(0, CFG.vocab, (2, 5))
    want = logits(q, ids)
    assert_close(logits(s, ids), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_cuda_takes_exact_two_four_only(graph):
    two_four = sparsify(pruned(graph, "2:4"), target="cuda")
    assert two_four.op_histogram()["sparse_linear"] == LINEARS
    assert {d["layout"] for d in two_four.meta["sparse"].values()} == {"nm"}
    assert "sparse_linear" not in sparsify(pruned(graph, "0.5"), target="cuda").op_histogram()


def _without_weights(graph):
    """The graph as a --no-weights compile sees it: every weight's file is absent."""
    def absent(src):
        if isinstance(src, Derived):
            return dataclasses.replace(src, sources=tuple(absent(s) for s in src.sources))
        a = src.load()
        return ExternalData("/nonexistent/model.onnx.data", 0, a.nbytes, DType.of(a), a.shape)

    return graph.replace(params={k: dataclasses.replace(p, source=absent(p.source))
                                 for k, p in graph.params.items()})


@pytest.mark.parametrize("sparsity", ["0.7", "2:4"])
def test_decisions_without_the_weights_are_the_same(graph, sparsity):
    """A pruned weight's zeros are known from the pruning config: a --no-weights compile makes
    the same decisions (layout, capacity) as one with the weights, so `kiln convert` fits."""
    p = pruned(graph, sparsity)
    bare = pruned(_without_weights(graph), sparsity)
    for target in ("cpu", "cuda"):
        with_weights, without = sparsify(p, target=target), sparsify(bare, target=target)
        assert with_weights.meta.get("sparse") == without.meta.get("sparse")
        assert with_weights.dump() == without.dump()


def test_recorded_decisions_are_replayed(graph):
    p = pruned(graph, "0.5")
    first = sparsify(p, target="cpu")
    assert sparsify(p, target="cpu", plan=first.meta["sparse"]).dump() == first.dump()
    assert sparsify(p, target="cpu", plan={}) is p  # an artifact with nothing sparse


def test_the_cost_model_weighs_bytes_against_arithmetic():
    """Fewer bytes pay only as far as the sparse kernel's arithmetic keeps up."""
    w = 1536 * 576
    bound = SparseTarget("bitmap", 40e9, (("int8", 40e9, 20e9),))
    assert bound.speedup("int8", w, w, w // 2) == pytest.approx(0.5)  # arithmetic-bound
    free = SparseTarget("bitmap", 40e9, (("float32", 1e12, 1e12),))
    assert free.speedup("float32", w, 4 * w, w) == pytest.approx(4.0)  # memory-bound
    assert free.speedup("int8", w, w, w) is None  # no int8 kernel
    cpu = SPARSE_TARGETS["cpu"]
    assert cpu.speedup("float32", w, 4 * w, int(1.33 * w)) > cpu.min_speedup  # fp32, 70%
