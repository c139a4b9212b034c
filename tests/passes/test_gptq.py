"""GPTQ: same layout and dequantization as round-to-nearest, lower output error on correlated
inputs, and the pass calibrates when it has token windows and the weights."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter.transformer_ops import dequantize
from kiln.compiler.ir import Attrs
from kiln.passes.gptq import gptq
from kiln.passes.quantize import pack_nibbles, parse_preset, quantize, quantize_weights


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 32, True), (4, 32, False), (8, 0, True), (8, 32, False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(rng, bits, group, symmetric,
                                                          act_order):
    n, k = 48, 100  # K not a multiple of the group: padded like quantize pads
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((600, k)) @ mix * (1 + 3 * (rng.random(k) > 0.9))
    w = rng.standard_normal((n, k)).astype(np.float32)
    attrs = Attrs({"bits": bits, "group_size": group or k, "in_features": k,
                   "out_features": n, "layout": "nk"})
    errors = {}
    for name, (q, s, z) in (("rtn", quantize(w, bits=bits, group=group, symmetric=symmetric)),
                            ("gptq", gptq(w, x.T @ x, bits=bits, group=group,
                                          symmetric=symmetric, act_order=act_order))):
        assert q.dtype == (np.int8 if bits == 8 else np.uint8)
        back = dequantize(pack_nibbles(q) if bits == 4 else q, s, z, attrs)
        errors[name] = np.linalg.norm(x @ (back - w).T) / np.linalg.norm(x @ w.T)
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def test_pass_calibrates_with_windows(rng):
    from kiln.codegen.testing import TINY, canonical_llama_graph

    g = canonical_llama_graph(TINY, seed=0)
    windows = (rng.integers(0, TINY.vocab, (1, 24)),)
    q = quantize_weights(g, preset=parse_preset("w4g32"), calibration=windows)
    fns = {q.params[v].source.fn for n in q.nodes if n.op == "quant_linear"
           for v in n.inputs[1:3]}
    assert fns == {"gptq"}
    rtn = quantize_weights(g, preset=parse_preset("w4g32-rtn"), calibration=windows)
    assert {rtn.params[v].source.fn for n in rtn.nodes if n.op == "quant_linear"
            for v in n.inputs[1:3]} == {"quantize"}
    some = next(n for n in q.nodes if n.op == "quant_linear" and n.attrs["bits"] == 4)
    assert q.params[some.inputs[1]].load().dtype == np.uint8  # the solve runs and packs


def test_calibration_is_sequential(rng):
    """H of each linear's input is x^T x with the linears before it quantized: with an identity
    solve it is the fp32 model's, with a perturbing one every later layer's H moves."""
    from kiln.codegen.testing import TINY, canonical_llama_graph
    from kiln.compiler.interpreter import run
    from kiln.passes.gptq import _feeds, calibrate

    g = canonical_llama_graph(TINY, seed=0)
    linears = [n for n in g.nodes if n.op == "linear"]
    windows = [rng.integers(0, TINY.vocab, (1, 16)) for _ in range(2)]
    ids = np.concatenate(windows)
    acts = run(g, _feeds(g, ids), outputs=sorted({n.inputs[0] for n in linears}))
    same = calibrate(g, [n.inputs[1] for n in linears], windows, lambda name, w, h: w)
    for n in linears:
        x = acts[n.inputs[0]].reshape(-1, acts[n.inputs[0]].shape[-1]).astype(np.float64)
        np.testing.assert_allclose(same[n.inputs[1]], x.T @ x, rtol=1e-5, atol=1e-6)
    moved = calibrate(g, [n.inputs[1] for n in linears], windows,
                      lambda name, w, h: w * 1.5 if name == linears[0].inputs[1] else w)
    first, later = linears[0].inputs[1], linears[-1].inputs[1]
    np.testing.assert_allclose(moved[first], same[first])  # its own input is upstream
    assert not np.allclose(moved[later], same[later])
