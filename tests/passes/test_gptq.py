"""GPTQ: same layout and dequantization as round-to-nearest, lower output error on correlated
inputs, and the pass calibrates when it has token windows and the weights."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter.transformer_ops import dequantize
from kiln.compiler.ir import Attrs
from kiln.passes.gptq import gptq
from kiln.passes.quantize import pack_nibbles, parse_preset, quantize, quantize_weights


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(4, 32, True), (4, 32, False), (8, 0, True), (8, 32, False)])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(rng, bits, group, symmetric):
    n, k = 48, 100  # K not a multiple of the group: padded like quantize pads
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((600, k)) @ mix * (1 + 3 * (rng.random(k) > 0.9))
    w = rng.standard_normal((n, k)).astype(np.float32)
    attrs = Attrs({"bits": bits, "group_size": group or k, "in_features": k,
                   "out_features": n, "layout": "nk"})
    errors = {}
    for name, (q, s, z) in (("rtn", quantize(w, bits=bits, group=group, symmetric=symmetric)),
                            ("gptq", gptq(w, x.T @ x, bits=bits, group=group,
                                          symmetric=symmetric))):
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
    some = next(n for n in q.nodes if n.op == "quant_linear")
    assert q.params[some.inputs[1]].load().dtype == np.uint8  # the solve runs and packs
