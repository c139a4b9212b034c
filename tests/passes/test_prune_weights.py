"""prune_weights: exact patterns for every method, the pruned graph's semantics, SparseGPT's lower
output error, quantization that keeps the zeros, and refusals of bad options."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kiln.codegen.testing import TINY, canonical_llama_graph
from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.interpreter.transformer_ops import dequantize
from kiln.passes.gptq import _feeds, sparsegpt
from kiln.passes.prune_weights import parse_config, prunable, prune_weights
from kiln.passes.quantize import pack_nibbles, parse_preset, quantize_weights
from kiln.runtime.pruning import Pattern, prune_magnitude
from tests.helpers import assert_close

METHODS = ("sparsegpt", "wanda", "magnitude")


@pytest.fixture(scope="module")
def graph():
    return canonical_llama_graph(TINY, seed=0)


@pytest.fixture(scope="module")
def windows():
    gen = np.random.default_rng(7)
    return tuple(gen.integers(0, TINY.vocab, (1, 24)) for _ in range(2))


def assert_pattern(w: np.ndarray, pattern: Pattern, name: str) -> None:
    """Exactly the pattern's zeros (seeded random weights hold no zeros of their own)."""
    n, k = w.shape
    if pattern.structured:
        kept = (w.reshape(n, k // pattern.m, pattern.m) != 0).sum(-1)
        assert (kept == pattern.n).all(), f"{name}: kept per group {np.unique(kept)}"
    else:
        zeros = (w == 0).sum(1)
        assert (zeros == round(pattern.fraction * k)).all(), f"{name}: zeros per row {zeros}"


@pytest.mark.parametrize("spec", ["0.3", "0.5", "0.7", "2:4", "4:8"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_prunes_the_exact_pattern(graph, windows, method, spec):
    pruned = prune_weights(graph, config=parse_config(spec, method), calibration=windows)
    chosen = prunable(graph)
    assert len(chosen) == 7 * TINY.layers  # q, k, v, o, gate, up, down of every layer
    for name in chosen:
        assert_pattern(pruned.params[name].load(), Pattern.parse(spec), f"{method} {name}")
    assert pruned.meta["sparsity"]["method"] == method
    # embeddings and the (tied) LM head stay dense
    for name in set(graph.params) - set(chosen):
        np.testing.assert_array_equal(pruned.params[name].load(), graph.params[name].load())


def test_keep_patterns_leave_layers_dense(graph, windows):
    pruned = prune_weights(graph, config=parse_config("0.5", "wanda", ("l1.*",)),
                           calibration=windows)
    assert (pruned.params["l0.wq"].load() == 0).mean() == 0.5
    np.testing.assert_array_equal(pruned.params["l1.wq"].load(), graph.params["l1.wq"].load())


@pytest.mark.parametrize("method", METHODS)
def test_pruned_graph_computes_with_the_pruned_weights(graph, windows, rng, method):
    """The interpreter on the pass's output = numpy on the pruned weights: the first q/k/v
    projection by hand, the logits through the original graph given the pruned arrays."""
    pruned = prune_weights(graph, config=parse_config("2:4", method), calibration=windows)
    arrays = {w: pruned.params[w].load() for w in prunable(graph)}
    feeds = _feeds(graph, rng.integers(0, TINY.vocab, (1, 9)))
    first = next(n for n in graph.nodes if n.op == "linear")
    got = run(pruned, feeds, outputs=[*graph.outputs, first.inputs[0], first.outputs[0]])
    x = got[first.inputs[0]].astype(np.float64)
    assert_close(got[first.outputs[0]], (x @ arrays[first.inputs[1]].T.astype(np.float64))
                 .astype(np.float32), name="first linear")
    want = run(graph, feeds, params=dict(arrays))
    for out in graph.outputs:
        assert_close(got[out], want[out], name=out)
    assert not np.allclose(got[graph.outputs[0]], run(graph, feeds)[graph.outputs[0]])


@pytest.mark.parametrize("spec", ["0.5", "0.7", "2:4"])
def test_sparsegpt_reconstructs_better_than_magnitude_and_wanda(rng, spec):
    n, k = 64, 256
    energy = np.exp(rng.normal(0, 1.0, k))  # input columns of very unequal energies,
    mix = np.eye(k) + rng.standard_normal((k, k)) / np.sqrt(k)  # correlated as activations are
    x = (rng.standard_normal((2048, k)) * energy) @ mix
    w = rng.standard_normal((n, k)).astype(np.float32)
    h = x.T @ x
    pattern = Pattern.parse(spec)
    norms = np.sqrt(np.diag(h))
    from kiln.runtime.pruning import prune

    candidates = {"sparsegpt": sparsegpt(w, h, pattern),
                  "wanda": prune(w, np.abs(w) * norms, pattern),
                  "magnitude": prune_magnitude(w, **pattern.to_dict())}
    err = {}
    for name, wp in candidates.items():
        assert_pattern(wp, pattern, name)
        err[name] = np.linalg.norm(x @ (wp - w).T) / np.linalg.norm(x @ w.T)
    # SparseGPT's correction uses the correlations; Wanda sees the energies only
    assert err["sparsegpt"] < 0.85 * err["wanda"] and err["wanda"] < err["magnitude"], err


def _correlated(rng, n: int, k: int, tokens: int = 1024):
    """(w[N, K], X[tokens, K]) with inputs of unequal, correlated columns, as activations are."""
    energy = np.exp(rng.normal(0, 1.0, k))
    x = (rng.standard_normal((tokens, k)) * energy) @ (np.eye(k) + rng.standard_normal((k, k))
                                                        / np.sqrt(k))
    return rng.standard_normal((n, k)).astype(np.float32), x


def test_refit_is_the_least_squares_of_the_kept_entries(rng):
    """Conjugate gradients on all rows at once = numpy's solve of each row's own system
    H[S, S] x_S = (H w)_S (S its kept entries); off S exactly 0."""
    from kiln.passes.gptq import hessian, refit

    w, x = _correlated(rng, 12, 40)
    H, _ = hessian(x.T @ x, 40, 0.01)
    keep = rng.random((12, 40)) < 0.5
    start = np.where(keep, rng.standard_normal((12, 40)), 7.0)
    got = refit(start, w.astype(np.float64), H, keep, steps=40)
    want = np.zeros((12, 40))
    for r in range(12):
        s = keep[r]
        want[r, s] = np.linalg.solve(H[np.ix_(s, s)], (H @ w[r].astype(np.float64))[s])
    assert (got[~keep] == 0).all()
    assert_close(got, want, rtol=1e-6, atol=1e-6, name="refit")


@pytest.mark.parametrize("spec", ["0.5", "2:4"])
def test_sparsegpt_refine_keeps_the_mask_and_lowers_the_error(rng, spec):
    w, x = _correlated(rng, 48, 192)
    h = x.T @ x
    pattern = Pattern.parse(spec)
    swept, refined = sparsegpt(w, h, pattern), sparsegpt(w, h, pattern, refine=30)
    np.testing.assert_array_equal(swept == 0, refined == 0)
    assert_pattern(refined, pattern, "refined")
    err = [np.linalg.norm(x @ (v - w).T) for v in (swept, refined)]
    assert err[1] < 0.95 * err[0], err


def test_sparsegpt_derivation_records_its_refinement(graph, windows):
    """The pass refines by default, and says so in the derivation and the config; a manifest
    from before (no "refine") reads back as the sweep alone."""
    from kiln.passes.gptq import REFINE
    from kiln.passes.prune_weights import DAMP_SPARSEGPT, PruneConfig

    pruned = prune_weights(graph, config=parse_config("0.5"), calibration=windows)
    src = pruned.params["l0.wq"].source
    assert src.fn == "sparsegpt" and src.attrs["refine"] == REFINE > 0
    assert src.attrs["damp"] == DAMP_SPARSEGPT
    assert pruned.meta["sparsity"]["refine"] == REFINE
    old = {k: v for k, v in pruned.meta["sparsity"].items() if k != "refine"}
    assert PruneConfig.from_dict(old).refine == 0
    assert PruneConfig.from_dict(pruned.meta["sparsity"]) == parse_config("0.5")


@pytest.mark.parametrize("preset", ["w4g32", "w8", "w4g32-rtn", "w4g32s"])
@pytest.mark.parametrize(("method", "spec"), [("sparsegpt", "0.5"), ("sparsegpt", "2:4"),
                                              ("wanda", "2:4"), ("magnitude", "0.7")])
def test_quantization_keeps_the_pattern(graph, windows, preset, method, spec):
    """Pruned, then quantized (GPTQ or round to nearest, zero points or not): the dequantized
    weights hold the pattern's zeros, exactly where the pruned weight has them."""
    pattern = Pattern.parse(spec)
    pruned = prune_weights(graph, config=parse_config(spec, method), calibration=windows)
    q = quantize_weights(pruned, preset=parse_preset(preset), calibration=windows)
    checked = 0
    for node in q.nodes:
        if node.op != "quant_linear":
            continue
        name = node.inputs[1].removesuffix(".qweight")
        if name not in prunable(graph):
            continue
        qw, s, z = (q.params[v].load() if v else None for v in node.inputs[1:4])
        w = dequantize(qw, s, z, node.attrs)
        k = node.attrs["in_features"]
        # a kept weight may round to zero by chance: at least the pattern's zeros, and
        # exactly where the pruned weight had them
        zeros = (w[:, :k] == 0)
        if pattern.structured:
            kept = (~zeros).reshape(len(w), k // pattern.m, pattern.m).sum(-1)
            assert (kept <= pattern.n).all(), name
        else:
            assert (zeros.sum(1) >= round(pattern.fraction * k)).all(), name
        assert zeros[pruned.params[name].load() == 0].all(), name
        checked += 1
    assert checked == len(prunable(graph))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_gptq_solves_a_pruned_weight_keeping_its_zeros(graph, windows, method):
    """GPTQ after pruning solves from the pruned weight (SparseGPT's: refit), not the original,
    and keeps its zeros."""
    pruned = prune_weights(graph, config=parse_config("2:4", method), calibration=windows)
    q = quantize_weights(pruned, preset=parse_preset("w8"), calibration=windows)
    src = q.params["l0.wq.qweight"].source
    assert src.fn == "gptq" and src.attrs["keep_zeros"] is True
    assert src.sources[0] is pruned.params["l0.wq"].source


def test_bit_packed_int4_zero_points_dequantize_zero_exactly(rng):
    """An all-positive group: its zero point is still a code, so a pruned entry is exactly 0."""
    from kiln.compiler.ir import Attrs
    from kiln.passes.gptq import gptq

    w = np.abs(rng.standard_normal((8, 64))).astype(np.float32) + 0.5
    w = prune_magnitude(w, fraction=0.5)
    x = rng.standard_normal((256, 64))
    q, s, z = gptq(w, x.T @ x, bits=4, group=32, symmetric=False, keep_zeros=True)
    attrs = Attrs({"bits": 4, "group_size": 32, "in_features": 64, "out_features": 8})
    back = dequantize(pack_nibbles(q), s, z, attrs)
    assert (back[w == 0] == 0).all() and (back[w != 0] != 0).mean() > 0.9


@pytest.mark.parametrize(("spec", "message"), [
    ("1.5", "between 0 and 1"), ("0", "between 0 and 1"), ("3:2", "0 < N < M"),
    ("2:x", "two integers"), ("half", "fraction such as 0.5")])
def test_bad_sparsity_is_refused(spec, message):
    with pytest.raises(KilnError, match=message):
        parse_config(spec)


def test_unknown_method_and_orphan_options_are_refused():
    with pytest.raises(KilnError, match="unknown; known: sparsegpt, wanda, magnitude"):
        parse_config("0.5", "obs")
    with pytest.raises(KilnError, match="--prune-method needs --sparsity"):
        parse_config(None, "wanda")


def test_nm_on_an_input_dim_not_a_multiple_of_m_names_the_node():
    g = canonical_llama_graph(dataclasses.replace(TINY, ffn=78), seed=0)
    with pytest.raises(KilnError, match=r"node l0\.d \(linear\), weight l0\.wd of shape "
                                        r"\[48, 78\]: --sparsity 2:4 needs the input dimension "
                                        r"to be a multiple of 4, got 78"):
        prune_weights(g, config=parse_config("2:4", "magnitude"))


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_calibrated_methods_need_calibration_text(graph, method):
    with pytest.raises(KilnError, match=r"no tokenizer\.json beside the model"):
        prune_weights(graph, config=parse_config("0.5", method), calibration=())
