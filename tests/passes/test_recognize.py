"""Recognition passes: each variant becomes its canonical op and computes the same values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.compiler.interpreter import run
from kiln.compiler.ir import DType
from tests.helpers import assert_close
from tests.passes.builder import GraphBuilder, canonicalize

F32 = DType.f32
E = 16  # features


def _same_values(g0, g1, feeds, **kw):
    a, b = run(g0, feeds, **kw), run(g1, feeds, **kw)
    for name in g0.outputs:
        assert_close(b[name], a[name], name=name)


def _x(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- norms --------------------------------------------------------------------------------------

def _rms(g: GraphBuilder, x: str, variant: str, weight: bool, rng) -> str:
    sq = g.op("Pow", x, g.const(2.0)) if variant != "mul_square" else g.op("Mul", x, x)
    ms = g.op("ReduceMean", sq, g.ints(-1), keepdims=1)
    var = g.op("Add", ms, g.const(1e-5))
    if variant == "div":
        normed = g.op("Div", x, g.op("Sqrt", var))
    elif variant == "reciprocal":
        normed = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", var)))
    elif variant == "pow":
        normed = g.op("Mul", x, g.op("Pow", var, g.const(-0.5)))
    else:
        normed = g.op("Mul", x, g.op("Div", g.const(1.0), g.op("Sqrt", var)))
    return g.op("Mul", g.const(rng.standard_normal(E)), normed) if weight else normed


@pytest.mark.parametrize("variant", ["one_over", "div", "reciprocal", "pow", "mul_square"])
@pytest.mark.parametrize("weight", [True, False])
def test_rms_norm_variants(rng, variant, weight):
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", "seq", E))
    g0 = g.build(_rms(g, x, variant, weight, rng))
    g1 = canonicalize(g0)
    assert [n.op for n in g1.nodes] == ["rms_norm"]
    assert g1.nodes[0].attrs["eps"] == pytest.approx(1e-5)
    _same_values(g0, g1, {"x": _x(rng, 2, 3, E)})


def test_layer_norm_decomposed_and_op(rng):
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", E))
    mean = g.op("ReduceMean", x, g.ints(-1), keepdims=1)
    c = g.op("Sub", x, mean)
    var = g.op("ReduceMean", g.op("Pow", c, g.const(2.0)), g.ints(-1), keepdims=1)
    normed = g.op("Div", c, g.op("Sqrt", g.op("Add", var, g.const(1e-6))))
    y1 = g.op("Add", g.op("Mul", normed, g.const(rng.standard_normal(E))),
              g.const(rng.standard_normal(E)))
    y2 = g.op("LayerNormalization", x, g.const(rng.standard_normal(E)),
              g.const(rng.standard_normal(E)), axis=-1, epsilon=1e-5)
    g0 = g.build(y1, y2)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"layer_norm": 2}
    _same_values(g0, g1, {"x": _x(rng, 3, E)})


# -- activations ----------------------------------------------------------------------------

def test_silu_and_gelus(rng):
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", E))
    silu = g.op("Mul", x, g.op("Sigmoid", x))
    erf = g.op("Mul", g.op("Mul", x, g.const(0.5)),
               g.op("Add", g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0)))), g.const(1.0)))
    cube = g.op("Pow", x, g.const(3.0))
    inner = g.op("Mul", g.op("Add", x, g.op("Mul", cube, g.const(0.044715))),
                 g.const(math.sqrt(2 / math.pi)))
    tanh = g.op("Mul", g.op("Mul", x, g.const(0.5)),
                g.op("Add", g.op("Tanh", inner), g.const(1.0)))
    g0 = g.build(silu, erf, tanh)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"gelu": 2, "silu": 1}
    assert {n.attrs.get("approximate") for n in g1.nodes if n.op == "gelu"} == {"none", "tanh"}
    _same_values(g0, g1, {"x": _x(rng, 4, E)})


def test_near_miss_constants_stay_generic(rng):
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", E))
    y = g.op("Mul", g.op("Mul", x, g.const(0.6)),  # 0.6, not 0.5: not a GELU
             g.op("Add", g.op("Erf", g.op("Div", x, g.const(math.sqrt(2.0)))), g.const(1.0)))
    g1 = canonicalize(g.build(y))
    assert "gelu" not in g1.op_histogram()


# -- linear ---------------------------------------------------------------------------------------

def test_linear_matmul_bias_and_gemm(rng):
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", "seq", E))
    w = g.const(rng.standard_normal((E, 8)))
    y1 = g.op("Add", g.op("MatMul", x, w), g.const(rng.standard_normal(8)))
    x2 = g.input("x2", F32, ("rows", E))
    y2 = g.op("Gemm", x2, g.const(rng.standard_normal((8, E))), g.const(rng.standard_normal(8)),
              transB=1)
    g0 = g.build(y1, y2)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 2}
    assert all(len(n.inputs) == 3 for n in g1.nodes)
    _same_values(g0, g1, {"x": _x(rng, 2, 3, E), "x2": _x(rng, 5, E)})


# -- rotary + attention ----------------------------------------------------------------------

H, KV, D = 4, 2, 8


def _heads(g, x, heads):
    return g.op("Transpose", g.op("Reshape", x, g.ints(0, 0, heads, D)), perm=(0, 2, 1, 3))


def _rope(g, x4, cos4, sin4, rot=D):
    src = x4 if rot == D else g.op("Slice", x4, g.ints(0), g.ints(rot), g.ints(-1))
    lo = g.op("Slice", src, g.ints(0), g.ints(rot // 2), g.ints(-1))
    hi = g.op("Slice", src, g.ints(rot // 2), g.ints(rot), g.ints(-1))
    rotated = g.op("Concat", g.op("Neg", hi), lo, axis=-1)
    out = g.op("Add", g.op("Mul", src, cos4), g.op("Mul", rotated, sin4))
    if rot == D:
        return out
    tail = g.op("Slice", x4, g.ints(rot), g.ints(D), g.ints(-1))
    return g.op("Concat", out, tail, axis=-1)


def _mask_bias(g, mask, causal: bool, window: int | None = None):
    """An HF-style additive mask built from attention_mask [batch, past+seq] with shape ops
    (keys within `window` of the query only, when given: a sliding window)."""
    total = g.op("Gather", g.op("Shape", mask), g.ints(1), axis=0)
    seq = g.op("Gather", g.op("Shape", "ids"), g.ints(1), axis=0)
    past = g.op("Sub", total, seq)
    keys = g.op("Range", g.const(0, np.int64), total, g.const(1, np.int64))
    queries = g.op("Range", past, total, g.const(1, np.int64))
    allowed = g.op("Cast", g.op("Unsqueeze", g.op("Unsqueeze", mask, g.ints(1)), g.ints(1)),
                   to=DType.bool)
    if causal:
        tri = g.op("LessOrEqual", g.op("Unsqueeze", keys, g.ints(0)),
                   g.op("Unsqueeze", queries, g.ints(1)))
        allowed = g.op("And", allowed, tri)
    if window is not None:
        near = g.op("Greater", g.op("Unsqueeze", keys, g.ints(0)),
                    g.op("Sub", g.op("Unsqueeze", queries, g.ints(1)), g.const(window, np.int64)))
        allowed = g.op("And", allowed, near)
    return g.op("Where", allowed, g.const(0.0), g.const(-np.inf))


def _attention_model(rng, *, rot=D, bias_kind="hf_causal"):
    g = GraphBuilder()
    g.input("ids", DType.i64, ("batch", "seq"))
    x = g.input("x", F32, ("batch", "seq", H * D))
    mask = g.input("attention_mask", DType.i64, ("batch", "past + seq"))
    cos = g.input("cos", F32, ("batch", "seq", rot))
    sin = g.input("sin", F32, ("batch", "seq", rot))
    past_k = g.input("past_k", F32, ("batch", KV, "past", D))
    past_v = g.input("past_v", F32, ("batch", KV, "past", D))
    cos4, sin4 = (g.op("Unsqueeze", t, g.ints(1)) for t in (cos, sin))
    q = _rope(g, _heads(g, g.op("MatMul", x, g.const(rng.standard_normal((H * D, H * D)))), H),
              cos4, sin4, rot)
    k = _rope(g, _heads(g, g.op("MatMul", x, g.const(rng.standard_normal((H * D, KV * D)))), KV),
              cos4, sin4, rot)
    v = _heads(g, g.op("MatMul", x, g.const(rng.standard_normal((H * D, KV * D)))), KV)
    present_k = g.op("Concat", past_k, k, axis=-2)
    present_v = g.op("Concat", past_v, v, axis=-2)

    def repeat(t):
        shape = g.op("Concat", g.op("Shape", t, end=2), g.ints(H // KV),
                     g.op("Shape", t, start=2), axis=0)
        e = g.op("Expand", g.op("Unsqueeze", t, g.ints(2)), shape)
        return g.op("Reshape", e, g.ints(0, H, -1, D))

    scale = g.const(1 / math.sqrt(math.sqrt(D)))
    scores = g.op("MatMul", g.op("Mul", q, scale),
                  g.op("Mul", g.op("Transpose", repeat(present_k), perm=(0, 1, 3, 2)), scale))
    if bias_kind == "hf_causal":
        scores = g.op("Add", scores, _mask_bias(g, mask, causal=True))
    elif bias_kind == "random":
        scores = g.op("Add", scores, g.const(rng.standard_normal((1, 1, 1, 1))))
    probs = g.op("Softmax", scores, axis=-1)
    probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)
    ctx = g.op("MatMul", probs, repeat(present_v))
    out = g.op("Reshape", g.op("Transpose", ctx, perm=(0, 2, 1, 3)), g.ints(0, 0, H * D))
    return g.build(out, present_k, present_v)


def _attention_feeds(rng, b=2, s=3, p=4, rot=D):
    mask = np.ones((b, p + s), np.int64)
    mask[1, :2] = 0
    pos = np.arange(p, p + s)[None, :, None] * rng.uniform(0.1, 1.0, (1, 1, rot))
    return {"ids": np.zeros((b, s), np.int64) + 1, "x": _x(rng, b, s, H * D),
            "attention_mask": mask, "cos": np.cos(pos).repeat(b, 0).astype(np.float32),
            "sin": np.sin(pos).repeat(b, 0).astype(np.float32),
            "past_k": _x(rng, b, KV, p, D), "past_v": _x(rng, b, KV, p, D)}


@pytest.mark.parametrize("rot", [D, D // 2])
def test_attention_block_with_hf_mask(rng, rot):
    g0 = _attention_model(rng, rot=rot)
    g1 = canonicalize(g0)
    hist = g1.op_histogram()
    assert hist == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}, hist  # fused q/k/v
    att = next(n for n in g1.nodes if n.op == "attention")
    assert att.attrs["causal"] is True and att.inputs[5] == "attention_mask"
    assert (att.attrs["num_heads"], att.attrs["num_kv_heads"], att.attrs["head_dim"]) == (H, KV, D)
    assert att.attrs["scale"] == pytest.approx(1 / math.sqrt(D))
    for s, p in ((3, 4), (1, 6), (5, 0)):
        _same_values(g0, g1, _attention_feeds(rng, s=s, p=p, rot=rot))


def test_attention_with_unrecognized_bias_keeps_it(rng):
    g0 = _attention_model(rng, bias_kind="random")
    g1 = canonicalize(g0)
    att = next(n for n in g1.nodes if n.op == "attention")
    assert att.attrs["causal"] is False and att.inputs[6]  # a generic additive bias
    _same_values(g0, g1, _attention_feeds(rng))
