"""quantize_weights: presets, the numpy scheme, the rewrite (tied LM head included) and layouts."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.codegen.testing import TINY, canonical_llama_graph
from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.interpreter.transformer_ops import dequantize
from kiln.compiler.ir import Attrs
from kiln.compiler.verify import verify
from kiln.passes import get_pass
from kiln.passes.quantize import (
    PRESETS,
    blocked,
    pack_nibbles,
    parse_preset,
    quantize,
    quantize_weights,
)
from tests.helpers import assert_close


def test_presets_parse():
    assert parse_preset("w4g32") == PRESETS["w4g32"]
    p = parse_preset("W4G64S", keep=("lm_head",))
    assert (p.bits, p.group_size, p.symmetric, p.keep) == (4, 64, True, ("lm_head",))
    w4 = parse_preset("w4g32")
    assert not w4.symmetric and set(w4.int8) == {"lm_head", "attn_qkv"} and w4.act_order
    assert parse_preset("w4g32-pure").int8 == () and parse_preset("w8").int8 == ()
    combo = parse_preset("w4g32-kv8")
    assert (combo.bits, combo.group_size, combo.kv_bits) == (4, 32, 8)
    assert parse_preset("w8").group_size == 0 and parse_preset("kv8").kv_bits == 8
    for bad in ("w3", "w4g32-w8", "", "w4g32-kv4"):
        with pytest.raises(KilnError, match="unknown quantization preset"):
            parse_preset(bad)
    assert parse_preset("w4g32-a8").act_bits == 8 and parse_preset("w4g32").act_bits == 0
    with pytest.raises(KilnError, match="-a8 quantizes the activations of quantized weights"):
        parse_preset("kv8-a8")


def test_a8_marks_the_quantized_linears_and_costs_little(rng):
    """-a8: every quant_linear (not the embedding) quantizes its activations per row; the
    interpreter's output stays within a few percent of the weight-only preset's."""
    g = canonical_llama_graph(TINY, seed=0)
    w4, a8 = (quantize_weights(g, preset=parse_preset(p)) for p in ("w4g32-rtn", "w4g32-rtn-a8"))
    assert {n.attrs.get("act_bits") for n in a8.nodes if n.op == "quant_linear"} == {8}
    assert all("act_bits" not in n.attrs for n in a8.nodes if n.op != "quant_linear")
    ids = rng.integers(0, TINY.vocab, (2, 9))
    want, got = _reference(w4, ids), _reference(a8, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < err < 0.05, f"a8 vs weight-only: {err:.3g}"


def test_int4_presets_take_int8_activations_where_the_target_multiplies_codes():
    """w4g*: int8 activations on a VNNI target, float ones elsewhere or with -a32; w8 keeps
    float activations unless -a8 asks."""
    assert parse_preset("w4g32").for_target(True).act_bits == 8
    assert parse_preset("w4g128s-rtn").for_target(True).act_bits == 8
    assert parse_preset("w4g32").for_target(False).act_bits == 0
    assert parse_preset("w4g32-a32").for_target(True).act_bits == 0
    assert parse_preset("w8").for_target(True).act_bits == 0
    assert parse_preset("w8-a8").for_target(False).act_bits == 8
    with pytest.raises(KilnError, match="contradict"):
        parse_preset("w4g32-a8-a32")


def test_manifest_record_round_trips_and_old_records_keep_their_meaning():
    from kiln.passes.quantize import QuantPreset

    for spec in ("w4g32", "w4g64s-kv8", "w8-rtn", "kv8", "w4g32-pure", "w4g32-a8", "w4g32-a32"):
        p = parse_preset(spec, keep=("lm_head",))
        assert QuantPreset.from_dict(p.to_dict()) == p
    old = {"preset": "w4g32a", "bits": 4, "group_size": 32, "symmetric": False, "kv_bits": 0,
           "keep": [], "method": "gptq"}  # a session-2 manifest: no roles, no act order
    p = QuantPreset.from_dict(old)
    assert (p.int8, p.act_order, p.symmetric) == ((), False, False)


@pytest.mark.parametrize(("bits", "group", "symmetric"),
                         [(8, 0, True), (8, 32, False), (4, 32, True), (4, 16, False)])
def test_quantize_roundtrip_is_within_half_a_step(rng, bits, group, symmetric):
    w = rng.standard_normal((37, 53), dtype=np.float32)
    q, scales, zp = quantize(w, bits=bits, group=group, symmetric=symmetric)
    g = group or 53
    attrs = Attrs({"bits": bits, "group_size": g, "in_features": 53, "out_features": 37,
                   "layout": "nk"})
    qw = pack_nibbles(q) if bits == 4 else q
    back = dequantize(qw, scales, zp, attrs)
    step = np.abs(np.repeat(scales, g, axis=1)[:, :53])  # a scale may be negative
    codes = q[:, :53].astype(np.int32)
    lo, hi = (-128, 127) if bits == 8 else (0, 15)
    inner = (codes > lo) & (codes < hi)  # codes not clipped at either end of the range
    assert inner.mean() > 0.5
    assert np.all(np.abs(back - w)[inner] <= 0.5 * step[inner] * 1.001 + 1e-7)
    assert np.abs(back - w).max() < (0.05 if bits == 8 else 0.6)
    blk = dequantize(blocked(qw), blocked(scales), None if zp is None else blocked(zp),
                     attrs.updated(layout="blocked"))
    np.testing.assert_array_equal(blk, back)  # the layouts hold the same numbers


def _reference(graph, ids):
    b, s = ids.shape
    feeds = {"input_ids": ids, "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy(),
             "attention_mask": np.ones((b, s), np.int64)}
    for i in range(TINY.layers):
        for kv in ("k", "v"):
            feeds[f"past_{kv}_{i}"] = np.zeros((b, TINY.kv_heads, 0, TINY.head_dim), np.float32)
    return run(graph, feeds, outputs=["logits"])["logits"]


@pytest.mark.parametrize("preset", ["w8", "w4g32-pure", "w4g32s-pure", "w4g32"])
def test_pass_quantizes_linears_and_tied_embedding(rng, preset):
    g = canonical_llama_graph(TINY, seed=0)  # tied: the LM head reads the embedding table
    q = quantize_weights(g, preset=parse_preset(preset))
    verify(q)
    hist = q.op_histogram()
    assert "linear" not in hist and hist["quant_linear"] == 7 * TINY.layers + 1
    assert hist["quant_embedding"] == 1 and "embed_tokens" not in q.params
    # rope tables and padding K=48 to 64 stay; w4g32 keeps the head and q/k/v at int8
    assert q.param_bytes() < g.param_bytes() / (2.5 if preset == "w4g32" else 3)
    ids = rng.integers(0, TINY.vocab, (2, 9))
    want, got = _reference(g, ids), _reference(q, ids)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (0.03 if preset == "w8" else 0.25), f"{preset}: {err:.3g} from fp32"
    blk = get_pass("pack_linear_weights")(q, block=16)  # the CPU layout: the very same numbers
    assert {n.attrs["layout"] for n in blk.nodes if n.op.startswith("quant_")} == {"blocked"}
    assert_close(_reference(blk, ids), got, rtol=1e-6, atol=1e-6, name=f"{preset} blocked")


def test_int8_roles_are_the_head_and_attention_inputs():
    g = canonical_llama_graph(TINY, seed=0)
    q = quantize_weights(g, preset=parse_preset("w4g32"))
    bits = {n.name: n.attrs["bits"] for n in q.nodes if n.op.startswith("quant_")}
    int8 = {name for name, b in bits.items() if b == 8}
    assert int8 == {"logits", "h0"} | {f"l{i}.{x}" for i in range(TINY.layers)
                                       for x in "qkv"}, int8
    assert {b for name, b in bits.items() if name not in int8} == {4}
    pure = quantize_weights(g, preset=parse_preset("w4g32-pure"))
    assert {n.attrs["bits"] for n in pure.nodes if n.op.startswith("quant_")} == {4}


def test_keep_patterns():
    g = canonical_llama_graph(TINY, seed=0)
    q = quantize_weights(g, preset=parse_preset("w4g32", keep=("lm_head", "l0.*")))
    lin = {n.name for n in q.nodes if n.op == "linear"}
    assert "logits" in lin and {"l0.q", "l0.d"} <= lin and "l1.q" not in lin
    assert "embed_tokens" in q.params and "quant_embedding" not in q.op_histogram()
    kv = parse_preset("w4g32-kv8")  # the weights pass leaves the cache to quantize_kv_cache
    assert kv.kv_bits == 8 and "quant_linear" in quantize_weights(g, preset=kv).op_histogram()


def test_type_rule_refuses_mismatched_weights():
    g = quantize_weights(canonical_llama_graph(TINY, seed=0), preset=parse_preset("w8"))
    node = next(n for n in g.nodes if n.op == "quant_linear")
    bad = node.attrs.updated(in_features=node.attrs["in_features"] + 1)
    from kiln.compiler import shapes

    with pytest.raises(KilnError, match=r"quant_linear.*nk layout expects"):
        shapes.infer(node.__class__(node.op, node.inputs, node.outputs, bad, node.name),
                     [g.types.get(v) if v else None for v in node.inputs])
