"""Mixed precision by measured sensitivity: the cost measure, the budgeted choice, `-auto`."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.codegen.testing import TINY, canonical_llama_graph
from kiln.compiler.errors import KilnError
from kiln.passes import quant_sensitivity as qs
from kiln.passes.quantize import AUTO_BUDGET, QuantPreset, parse_preset, quantize_weights


def test_output_nsr_is_the_relative_output_error_on_the_inputs(rng):
    x = rng.standard_normal((64, 48)) * rng.uniform(0.1, 3.0, 48)  # uneven input energy
    w = rng.standard_normal((24, 48)).astype(np.float32)
    h = x.T @ x
    for scheme in ((4, 16, False), (8, 0, True)):
        bits, group, sym = scheme
        q, s, z = qs.qf.quantize_codes(w, bits=bits, group=group, symmetric=sym,
                                       clip=qs.qf.CLIP_SEARCH)
        deq = qs.qf.dequantize(qs.qf.pack_codes(q, bits), s, z, bits=bits, k=48)
        direct = np.sum((x @ (w - deq).T) ** 2) / np.sum((x @ w.T) ** 2)
        assert qs.output_nsr(w, h, scheme) == pytest.approx(direct, rel=1e-9)
    assert qs.output_nsr(w, h, qs.INT8) < qs.output_nsr(w, h, (4, 16, False)) / 50


def test_scheme_bytes_count_codes_scales_and_zero_points():
    assert qs.scheme_bytes(10, 64, (8, 0, True)) == 10 * 64 + 10 * 4
    assert qs.scheme_bytes(10, 64, (4, 32, False)) == 10 * 32 + 10 * 2 * 8
    assert qs.scheme_bytes(10, 48, (4, 32, True)) == 10 * 32 + 10 * 2 * 4  # K padded to 64


def test_choice_takes_the_best_error_per_byte_within_the_budget():
    costs = {"a": (0.5, 0.0, 100, 200),   # 0.005 per extra byte
             "b": (0.2, 0.0, 10, 20),     # 0.02: best
             "c": (0.3, 0.1, 100, 300),   # 0.001
             "d": (0.1, 0.2, 10, 20)}     # int8 no better: never
    assert qs.choose_int8(costs, 10) == {"b"}
    assert qs.choose_int8(costs, 109) == {"b"}  # a's 100 extra bytes do not fit beside b's 10
    assert qs.choose_int8(costs, 110) == {"a", "b"}
    assert qs.choose_int8(costs, 10_000) == {"a", "b", "c"}
    assert qs.choose_int8(costs, 0) == set()


def test_auto_presets_parse_and_round_trip():
    p = parse_preset("w4g32-auto")
    assert p.int8_budget == AUTO_BUDGET and parse_preset("w4g32-auto0.3").int8_budget == 0.3
    assert QuantPreset.from_dict(p.to_dict()) == p
    assert parse_preset("kv8-auto").int8_budget == 0.0  # no weights quantized: nothing to pick
    for bad in ("w4g32-auto0", "w4g32-auto2", "w4g32-autox"):
        with pytest.raises(KilnError, match="budget"):
            parse_preset(bad)


@pytest.mark.parametrize("budget", [0.03, 0.08])
def test_auto_puts_weights_at_int8_within_the_budget(rng, budget):
    g = canonical_llama_graph(TINY, seed=0)
    windows = (rng.integers(0, TINY.vocab, (1, 16)), rng.integers(0, TINY.vocab, (1, 16)))
    q = quantize_weights(g, preset=parse_preset(f"w4g32-auto{budget}"), calibration=windows)
    low = (4, 32, False)
    shapes = {n.name: tuple(g.params[n.inputs[1]].type.shape) for n in g.nodes
              if n.op == "linear"}
    bits = {n.name: n.attrs["bits"] for n in q.nodes if n.op == "quant_linear"}
    assert bits.keys() == shapes.keys() and set(bits.values()) == {4, 8}
    spent = sum(qs.scheme_bytes(*shapes[n], qs.INT8) - qs.scheme_bytes(*shapes[n], low)
                for n, b in bits.items() if b == 8)
    assert 0 < spent <= budget * sum(qs.scheme_bytes(*s, low) for s in shapes.values())
    more = quantize_weights(g, preset=parse_preset("w4g32-auto1"), calibration=windows)
    assert all(n.attrs["bits"] == 8 for n in more.nodes if n.op == "quant_linear")

