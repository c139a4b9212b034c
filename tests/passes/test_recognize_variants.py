"""Recognition of architecture variants: per-head q/k norms, fused projections cut by Slice,
partial and interleaved rotary, GeGLU and sliding-window masks (canonical op, same values)."""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest

from kiln.compiler.ir import DType
from tests.passes.builder import GraphBuilder, canonicalize
from tests.passes.test_recognize import _mask_bias, _same_values, _x

F32 = DType.f32
H, D, E = 4, 8, 32


def _rms_heads(g: GraphBuilder, x: str, rng) -> str:
    """RMSNorm over the last axis (head_dim) with a [D] weight."""
    ms = g.op("ReduceMean", g.op("Pow", x, g.const(2.0)), g.ints(-1), keepdims=1)
    inv = g.op("Div", g.const(1.0), g.op("Sqrt", g.op("Add", ms, g.const(1e-6))))
    return g.op("Mul", g.const(1.0 + 0.1 * rng.standard_normal(D)), g.op("Mul", x, inv))


def _split(g: GraphBuilder, flat: str, heads: int, norm: str, rng) -> str:
    """[b, s, heads*D] -> [b, heads, s, D], with an optional per-head RMSNorm before
    ("bshd": Qwen3) or after ("bhsd": Gemma3) the transpose."""
    x = g.op("Reshape", flat, g.ints(0, 0, heads, D))
    if norm == "bshd":
        x = _rms_heads(g, x, rng)
    x = g.op("Transpose", x, perm=(0, 2, 1, 3))
    return _rms_heads(g, x, rng) if norm == "bhsd" else x


def _cut(g: GraphBuilder, x: str, start: int, stop: int, step: int = 1) -> str:
    return g.op("Slice", x, g.ints(start), g.ints(stop), g.ints(-1), g.ints(step))


def _rope(g: GraphBuilder, x: str, cos: str, sin: str, *, rot: int, pairs: bool) -> str:
    src = x if rot == D else _cut(g, x, 0, rot)
    if pairs:  # GPT-J: stack(-x[..., 1::2], x[..., ::2]) flattened
        odd = g.op("Unsqueeze", g.op("Neg", _cut(g, src, 1, 2**62, 2)), g.ints(-1))
        even = g.op("Unsqueeze", _cut(g, src, 0, 2**62, 2), g.ints(-1))
        rotated = g.op("Reshape", g.op("Concat", odd, even, axis=-1), g.ints(0, 0, 0, rot))
    else:
        rotated = g.op("Concat", g.op("Neg", _cut(g, src, rot // 2, rot)),
                       _cut(g, src, 0, rot // 2), axis=-1)
    out = g.op("Add", g.op("Mul", src, cos), g.op("Mul", rotated, sin))
    return out if rot == D else g.op("Concat", out, _cut(g, x, rot, D), axis=-1)


def _qkv(g: GraphBuilder, x: str, kv: int, fused: str, norm: str, rng):
    """q, k, v as [b, heads, s, D]: separate projections, one projection cut by Slice (Phi-3),
    one in the per-head [q|k|v] layout cut after the head split by Slice (GPT-NeoX) or Split
    (CodeGen, through a [.., H, 1, D] round trip), or Falcon's [b, s, H + 2, D] multi-query
    layout cut along the head axis."""
    sizes = (H * D, kv * D, kv * D)
    if fused in ("heads", "split"):
        proj = g.op("MatMul", x, g.const(rng.standard_normal((E, 3 * H * D)) * 0.2))
        heads = g.op("Reshape", proj, g.ints(0, 0, H, 3 * D))
        if fused == "split":
            parts = g.op("Split", heads, g.ints(D, D, D), axis=-1, outputs=3)
            parts = [g.op("Reshape", g.op("Reshape", t, g.ints(0, 0, H, 1, D)),
                          g.ints(0, 0, H, D)) for t in parts]
            return [g.op("Transpose", t, perm=(0, 2, 1, 3)) for t in parts]
        t = g.op("Transpose", heads, perm=(0, 2, 1, 3))
        return [_cut(g, t, i * D, (i + 1) * D) for i in range(3)]
    if fused == "bigcode":  # [b, 1, s, H*D + 2*D] cut by Split: q heads, one k and one v head
        proj = g.op("MatMul", x, g.const(rng.standard_normal((E, (H + 2) * D)) * 0.2))
        q, k, v = g.op("Split", g.op("Unsqueeze", proj, g.ints(1)), g.ints(H * D, D, D),
                       axis=3, outputs=3)
        q = g.op("Transpose", g.op("Reshape", q, g.ints(0, -1, H, D)), perm=(0, 2, 1, 3))
        return [q, k, v]
    if fused == "mqa":
        proj = g.op("MatMul", x, g.const(rng.standard_normal((E, (H + 2) * D)) * 0.2))
        heads = g.op("Reshape", proj, g.ints(0, 0, H + 2, D))
        parts = [g.op("Slice", heads, g.ints(0), g.ints(-2), g.ints(2)),
                 g.op("Gather", heads, g.ints(H), axis=2),
                 g.op("Gather", heads, g.ints(-1), axis=2)]
        return [g.op("Transpose", t, perm=(0, 2, 1, 3)) for t in parts]
    if fused == "slice":
        proj = g.op("MatMul", x, g.const(rng.standard_normal((E, sum(sizes))) * 0.2))
        bounds = np.cumsum((0, *sizes))
        flats = [_cut(g, proj, int(a), int(b)) for a, b in pairwise(bounds)]
    else:
        flats = [g.op("MatMul", x, g.const(rng.standard_normal((E, n)) * 0.2)) for n in sizes]
    return [_split(g, f, n // D, norm if i < 2 else "none", rng)
            for i, (f, n) in enumerate(zip(flats, sizes, strict=True))]


def _banded_where(g: GraphBuilder, scores: str, window: int, max_pos: int = 40) -> str:
    """GPT-Neo: where(band[past:past+seq, :past+seq], scores, min) from a fixed causal buffer of
    max_pos positions, local to `window` keys."""
    i, j = np.arange(max_pos)[:, None], np.arange(max_pos)[None, :]
    band = g.const(((j <= i) & (j > i - window))[None, None], np.bool_)
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.ints(1), axis=0)
    past = g.op("Sub", total, g.op("Gather", g.op("Shape", "ids"), g.ints(1), axis=0))
    rows = g.op("Slice", band, g.op("Unsqueeze", past, g.ints(0)),
                g.op("Unsqueeze", total, g.ints(0)), g.ints(2))
    keep = g.op("Slice", rows, g.ints(0), g.op("Unsqueeze", total, g.ints(0)), g.ints(3))
    return g.op("Where", keep, scores, g.const(np.finfo(np.float32).min))


def _model(rng, *, kv=2, rot=D, pairs=False, fused="none", norm="none", window=None,
           bias="mask", post_scale=False, where_window=None):
    g = GraphBuilder()
    g.input("ids", DType.i64, ("batch", "seq"))
    x = g.input("x", F32, ("batch", "seq", E))
    mask = g.input("attention_mask", DType.i64, ("batch", "past + seq"))
    cos, sin = (g.input(n, F32, ("batch", "seq", rot)) for n in ("cos", "sin"))
    past_k, past_v = (g.input(n, F32, ("batch", kv, "past", D)) for n in ("past_k", "past_v"))
    cos4, sin4 = (g.op("Unsqueeze", t, g.ints(1)) for t in (cos, sin))
    q, k, v = _qkv(g, x, kv, fused, norm, rng)
    q, k = (_rope(g, t, cos4, sin4, rot=rot, pairs=pairs) for t in (q, k))
    present_k, present_v = g.op("Concat", past_k, k, axis=-2), g.op("Concat", past_v, v, axis=-2)

    def repeat(t):
        if kv in (1, H):  # one key/value head: the matmuls broadcast it
            return t
        e = g.op("Expand", g.op("Unsqueeze", t, g.ints(2)),
                 g.op("Concat", g.op("Shape", t, end=2), g.ints(H // kv),
                      g.op("Shape", t, start=2), axis=0))
        return g.op("Reshape", e, g.ints(0, H, -1, D))

    kt = g.op("Transpose", repeat(present_k), perm=(0, 1, 3, 2))
    scores, scale = g.op("MatMul", q, kt), g.const(math.sqrt(D))
    scores = scores if post_scale else g.op("Div", scores, scale)
    if where_window is not None:
        scores = _banded_where(g, scores, where_window)
    scores = g.op("Add", scores, _mask_bias(g, mask, causal=True, window=window)
                  if bias == "mask" else g.const(rng.standard_normal((1, 1, 1, 1))))
    scores = g.op("Div", scores, scale) if post_scale else scores  # CodeGen
    probs = g.op("Softmax", scores, axis=-1)
    probs = g.op("Where", g.op("IsNaN", probs), g.const(0.0), probs)  # rows with no key: 0
    ctx = g.op("MatMul", probs, repeat(present_v))
    out = g.op("Reshape", g.op("Transpose", ctx, perm=(0, 2, 1, 3)), g.ints(0, 0, H * D))
    return g.build(out, present_k, present_v)


def _feeds(rng, *, kv=2, rot=D, pairs=False, b=2, s=3, p=4):
    mask = np.ones((b, p + s), np.int64)
    mask[1, :2] = 0
    freqs = rng.uniform(0.1, 1.0, rot // 2)
    freqs = np.repeat(freqs, 2) if pairs else np.concatenate([freqs, freqs])
    pos = np.arange(p, p + s)[None, :, None] * freqs
    return {"ids": np.ones((b, s), np.int64), "x": _x(rng, b, s, E), "attention_mask": mask,
            "cos": np.cos(pos).repeat(b, 0).astype(np.float32),
            "sin": np.sin(pos).repeat(b, 0).astype(np.float32),
            "past_k": _x(rng, b, kv, p, D), "past_v": _x(rng, b, kv, p, D)}


def _attention(g1):
    (att,) = [n for n in g1.nodes if n.op == "attention"]
    return att


def _check(rng, g0, g1, **kw):
    for s, p in ((3, 4), (1, 6), (5, 0)):
        _same_values(g0, g1, _feeds(rng, s=s, p=p, **kw))


@pytest.mark.parametrize("norm", ["bshd", "bhsd"])
def test_per_head_qk_norm_becomes_grouped_rms_norm(rng, norm):
    g0 = _model(rng, norm=norm)
    g1 = canonicalize(g0)
    hist = g1.op_histogram()
    assert hist == {"linear": 1, "Split": 1, "rms_norm": 2, "rotary": 2, "attention": 1}, hist
    assert {n.attrs.get("group_size") for n in g1.nodes if n.op == "rms_norm"} == {D}
    assert _attention(g1).attrs["causal"] is True
    _check(rng, g0, g1)


def test_fused_projection_cut_by_slice_becomes_split(rng):
    g0 = _model(rng, fused="slice")
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}
    _check(rng, g0, g1)


@pytest.mark.parametrize("rot", [D, D // 2])
def test_per_head_fused_qkv_and_partial_rotary(rng, rot):
    g0 = _model(rng, kv=H, rot=rot, fused="heads")
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}
    att = _attention(g1)
    assert (att.attrs["num_heads"], att.attrs["num_kv_heads"], att.attrs["head_dim"]) == (H, H, D)
    _check(rng, g0, g1, kv=H, rot=rot)


@pytest.mark.parametrize("rot", [D, D // 2])
def test_interleaved_rotary(rng, rot):
    g0 = _model(rng, rot=rot, pairs=True)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}
    assert all(n.attrs["interleaved"] for n in g1.nodes if n.op == "rotary")
    _check(rng, g0, g1, rot=rot, pairs=True)


def test_rotate_half_is_not_taken_for_pairs(rng):
    """Stacking the halves on the second-to-last axis is not the interleaved rotation."""
    g = GraphBuilder()
    x = g.input("x", F32, ("batch", "seq", H, D))
    cos, sin = (g.input(n, F32, ("batch", "seq", 1, D)) for n in ("cos", "sin"))
    odd = g.op("Unsqueeze", g.op("Neg", _cut(g, x, 1, D, 2)), g.ints(-2))
    even = g.op("Unsqueeze", _cut(g, x, 0, D, 2), g.ints(-2))
    rotated = g.op("Reshape", g.op("Concat", odd, even, axis=-2), g.ints(0, 0, 0, D))
    g0 = g.build(g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin)))
    assert "rotary" not in canonicalize(g0).op_histogram()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gated_gelu_becomes_gelu_mul(rng, approximate):
    g = GraphBuilder()
    gate, up = g.input("gate", F32, ("batch", E)), g.input("up", F32, ("batch", E))
    if approximate == "tanh":
        cube = g.op("Mul", g.op("Mul", gate, gate), gate)
        inner = g.op("Mul", g.op("Add", gate, g.op("Mul", cube, g.const(0.044715))),
                     g.const(math.sqrt(2 / math.pi)))
        act = g.op("Mul", g.op("Mul", gate, g.const(0.5)),
                   g.op("Add", g.op("Tanh", inner), g.const(1.0)))
    else:
        act = g.op("Gelu", gate)
    g0 = g.build(g.op("Mul", act, up))
    g1 = canonicalize(g0)
    assert [(n.op, n.attrs["approximate"]) for n in g1.nodes] == [("gelu_mul", approximate)]
    _same_values(g0, g1, {"gate": _x(rng, 3, E) * 2, "up": _x(rng, 3, E)})


def test_gelu_times_broadcast_stays_generic(rng):
    g = GraphBuilder()
    gate, up = g.input("gate", F32, ("batch", 1)), g.input("up", F32, ("batch", E))
    g1 = canonicalize(g.build(g.op("Mul", g.op("Gelu", gate), up)))
    assert "gelu_mul" not in g1.op_histogram()


@pytest.mark.parametrize("window", [3, 6])
def test_sliding_window_mask(rng, window):
    g0 = _model(rng, window=window)
    g1 = canonicalize(g0)
    att = _attention(g1)
    assert att.attrs["causal"] is True and att.attrs["window"] == window
    assert att.inputs[5] == "attention_mask" and not att.inputs[6]
    _check(rng, g0, g1)
    _same_values(g0, g1, _feeds(rng, s=9, p=2))  # longer than the window


def test_wide_sliding_window_is_not_taken_for_causal(rng):
    """A window far longer than the short probes still shows on the long probe."""
    att = _attention(canonicalize(_model(rng, window=5000)))
    assert att.attrs["causal"] is True and att.attrs["window"] == 5000


def test_head_split_by_split_and_mask_scaled_after(rng):
    g0 = _model(rng, kv=H, rot=D // 2, pairs=True, fused="split", post_scale=True)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}
    att = _attention(g1)
    assert att.attrs["causal"] is True and att.attrs["scale"] == pytest.approx(1 / math.sqrt(D))
    _check(rng, g0, g1, kv=H, rot=D // 2, pairs=True)


def test_generic_bias_scaled_after_stays_generic(rng):
    g0 = _model(rng, post_scale=True, bias="random")
    g1 = canonicalize(g0)
    assert "attention" not in g1.op_histogram()
    _check(rng, g0, g1)


@pytest.mark.parametrize("fused", ["mqa", "bigcode"])
def test_multi_query_heads_cut_along_the_head_axis(rng, fused):
    g0 = _model(rng, kv=1, fused=fused)
    g1 = canonicalize(g0)
    assert g1.op_histogram() == {"linear": 1, "Split": 1, "rotary": 2, "attention": 1}
    att = _attention(g1)
    assert (att.attrs["num_heads"], att.attrs["num_kv_heads"]) == (H, 1)
    _check(rng, g0, g1, kv=1)


def test_scores_kept_by_where_from_a_buffer(rng):
    """The window (10) shows only on probes longer than the short ones; the 40-position buffer
    cannot build longer masks, so the longest probe is found by bisection."""
    g0 = _model(rng, where_window=10)
    g1 = canonicalize(g0)
    att = _attention(g1)
    assert att.attrs["causal"] is True and att.attrs["window"] == 10
    assert att.inputs[5] == "attention_mask" and not att.inputs[6]
    _check(rng, g0, g1)
    _same_values(g0, g1, _feeds(rng, s=9, p=20))


def test_window_at_the_buffer_length_never_binds(rng):
    att = _attention(canonicalize(_model(rng, where_window=40)))
    assert att.attrs["causal"] is True and "window" not in att.attrs
