"""Recognize scaled-dot-product attention over split heads -> attention.

    scores  = (q * sq) @ (kᵀ * sk) * s        (any of the scale factors may be absent, or a Div)
    probs   = softmax(scores + bias)          (optionally guarded: where(isnan(p), 0, p))
    context = merge_heads(probs @ v)

where q, k, v are projections split into heads, k and v may be the KV-cache concatenation
concat(past, new) (their concat outputs become attention's present outputs) and may be repeated
across query-head groups (GQA/MQA: unsqueeze, expand, reshape). The bias subgraph, typically
hundreds of mask-building nodes, is classified by evaluating it on probe inputs: when it equals a
causal and/or padding mask built from one 2-D input, it disappears into attention's `causal`
attribute and `mask` input; otherwise it stays as a generic additive `bias`, still exact.

Requires: constants folded, linear and rotary recognized. Preserves: the output types, the present
key/value outputs.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.ir import Graph, evaluate_dim
from kiln.compiler.shapes import dims_equal
from kiln.passes import register
from kiln.passes.patterns import Const, Matcher, Op, Skip, Var
from kiln.passes.queries import axis_is_last, int_list, perm_is, scalar, shape_of
from kiln.passes.recognize_rotary import split_heads
from kiln.passes.rewrite import GraphEditor, rewrite


def _scaled(p, tag: str):
    return (Op("Mul", p, Const(f"mul_{tag}", scalar=True)) |
            Op("Div", p, Const(f"div_{tag}", scalar=True)) | p)


def _merged_batch_heads(m: Matcher, node) -> bool:
    """A Reshape [b, H, T, D] -> [b*H, T, D] (torch's bmm form of a 4-D matmul)."""
    src, out = shape_of(m, node.inputs[0]), shape_of(m, node.outputs[0])
    return bool(src and out and len(src) == 4 and len(out) == 3 and
                dims_equal(out[0], src[0] * src[1]) and tuple(out[1:]) == tuple(src[2:]))


K_T = (Op("Transpose", Var("kx"), where=perm_is(0, 1, 3, 2))
       | Op("Reshape", Op("Transpose", Op("Reshape", Var("kx"), where=_merged_batch_heads),
                          where=perm_is(0, 2, 1))))
SCORES = _scaled(Op("MatMul", _scaled(Var("q4"), "q"), _scaled(K_T, "k")), "s")
BIASED = Op("Add", SCORES, Var("bias")) | SCORES
PROBS = Op("Softmax", Skip("Cast", BIASED), where=axis_is_last())
GUARDED = Op("Where", Op("IsNaN", PROBS), Const(value=0.0), PROBS) | PROBS
CONTEXT = Op("MatMul", Skip("Cast", GUARDED), Var("vx"))
MERGED = Op("Reshape", Op("Transpose", CONTEXT, where=perm_is(0, 2, 1, 3)))

REPEAT_KV = Op("Reshape", Op("Expand", Op("Unsqueeze", Var("kv"), name="unsq")))
CACHE = Op("Concat", Var("past"), Var("new"), name="concat")


def _scale(m: Matcher, b: dict) -> float:
    s = 1.0
    for key, value in b.items():
        if key.startswith("mul_"):
            s *= scalar(m, value)
        elif key.startswith("div_"):
            s /= scalar(m, value)
    return s


def _unrepeat(m: Matcher, kx: str) -> tuple[str, int]:
    """(the un-repeated [b, KV, T, D] tensor, group size) for a GQA-repeated key or value."""
    b = m.first(REPEAT_KV, kx)
    if b is not None and int_list(m, b["unsq"], "axes", 1) in ((2,), (-3,)):
        src, out = shape_of(m, b["kv"]), shape_of(m, kx)
        if src and out and len(src) == 4 and isinstance(src[1], int) and \
                isinstance(out[1], int) and out[1] % src[1] == 0:
            return b["kv"], out[1] // src[1]
    return kx, 1


def _cache(m: Matcher, kv: str) -> tuple[str | None, str, object | None]:
    """(past, new heads, the concat node) for concat(past, new) along the sequence axis."""
    b = m.first(CACHE, kv)
    if b is not None and b["concat"].attrs.get("axis") in (2, -2):
        return b["past"], b["new"], b["concat"]
    return None, kv, None


# -- mask classification -------------------------------------------------------------------

PROBES = ({"batch": 3, "seq": 4, "past": 3}, {"batch": 2, "seq": 1, "past": 6},
          {"batch": 2, "seq": 5, "past": 0})


def classify_bias(graph: Graph, bias: str) -> tuple[str | None, bool] | None:
    """(mask input or None, causal) when the additive bias is exactly a causal and/or padding
    mask over one 2-D integer input; None when it is anything else."""
    producer = graph.producers()
    cone, inputs, shape_only = _cone(graph, producer, bias)
    if len(inputs) > 1:
        return None
    mask = next(iter(inputs), None)
    if mask is not None:
        t = graph.types[mask]
        if t.rank != 2 or not (t.dtype.is_int or t.dtype.name == "bool"):
            return None
    sub = graph.replace(nodes=tuple(n for n in graph.nodes if id(n) in cone),
                        inputs=tuple(inputs | shape_only), outputs=(bias,))
    hypotheses = [(mask, True), (mask, False)] + ([(None, True)] if mask else [])
    rng = np.random.default_rng(0)
    for probe in PROBES:
        feeds = {mask: _probe_mask(rng, probe)} if mask else {}
        for v in shape_only - inputs:  # read through Shape only: any data of the right shape
            shape = graph.types[v].shape
            if shape is None:
                return None
            try:
                dims = [evaluate_dim(d, probe) for d in shape]
            except KeyError:
                return None
            feeds[v] = np.zeros(dims, graph.types[v].dtype.numpy)
        try:
            got = run(sub, feeds, bindings=probe)[bias]
        except (KilnError, KeyError, ValueError):
            return None
        hypotheses = [h for h in hypotheses if _bias_matches(got, probe, feeds.get(mask), *h)]
    return hypotheses[0] if hypotheses else None


def _cone(graph: Graph, producer, value: str) -> tuple[set[int], set[str], set[str]]:
    """(nodes computing `value`, graph inputs whose data they read, inputs read by Shape only)."""
    nodes: set[int] = set()
    inputs: set[str] = set()
    shape_only: set[str] = set()
    stack = [value]
    graph_inputs = set(graph.inputs)
    while stack:
        v = stack.pop()
        n = producer.get(v)
        if n is None or id(n) in nodes:
            continue
        nodes.add(id(n))
        for i in n.inputs:
            if i in graph_inputs:
                (shape_only if n.op == "Shape" else inputs).add(i)
            elif i:
                stack.append(i)
    return nodes, inputs, shape_only


def _probe_mask(rng: np.random.Generator, probe: dict) -> np.ndarray:
    b, total = probe["batch"], probe["past"] + probe["seq"]
    m = np.ones((b, total), np.int64)
    m[-1, : total // 2] = 0  # left padding
    if b > 2:
        m[1] = rng.integers(0, 2, total)
        m[1, -1] = 1
    return m


def _bias_matches(got: np.ndarray, probe: dict, mask, mask_name, causal: bool) -> bool:
    b, s, p = probe["batch"], probe["seq"], probe["past"]
    if got.ndim != 4:
        return False
    try:
        full = np.broadcast_to(got, (b, got.shape[1], s, p + s))
    except ValueError:
        return False
    allowed = np.ones((b, 1, s, p + s), bool)
    if causal:
        allowed &= (np.arange(p + s)[None, :] <= p + np.arange(s)[:, None])[None, None]
    if mask_name is not None:
        allowed &= (mask != 0)[:, None, None, :]
    allowed = np.broadcast_to(allowed, full.shape)
    return bool(np.all(full[allowed] == 0) and np.all(full[~allowed] <= -1e4))


# -- the rewrite -------------------------------------------------------------------------------

def _heads_of(m: Matcher, value: str):
    heads = split_heads(m, value)
    return heads if heads is not None and heads[3] == 1 else None


def _build(ed: GraphEditor, node, b: dict) -> bool:
    m = ed.matcher
    q = _heads_of(m, b["q4"])
    (k_all, gk), (v_all, gv) = _unrepeat(m, b["kx"]), _unrepeat(m, b["vx"])
    (k_past, k_new, k_cat), (v_past, v_new, v_cat) = _cache(m, k_all), _cache(m, v_all)
    k, v = _heads_of(m, k_new), _heads_of(m, v_new)
    if q is None or k is None or v is None or gk != gv or (k_past is None) != (v_past is None):
        return False
    (q_flat, h, d, _), (k_flat, kvh, dk, _), (v_flat, kvh_v, dv, _) = q, k, v
    if h != kvh * gk or kvh != kvh_v or not d == dk == dv:
        return False
    out_shape, q_shape = shape_of(m, node.outputs[0]), shape_of(m, q_flat)
    if out_shape is None or q_shape is None or len(out_shape) != 3 or out_shape[2] != h * d:
        return False
    attrs = {"num_heads": h, "num_kv_heads": kvh, "head_dim": d, "scale": _scale(m, b),
             "causal": False}
    mask, bias = "", ""
    if "bias" in b:
        kind = classify_bias(m.graph, b["bias"])
        if kind is None:
            bias = b["bias"]
        else:
            mask, attrs["causal"] = kind[0] or "", kind[1]
    presents = [k_all if k_cat else ed.fresh(f"{node.name}:present_k"),
                v_all if v_cat else ed.fresh(f"{node.name}:present_v")]
    ed.emit("attention", [q_flat, k_flat, v_flat, k_past or "", v_past or "", mask, bias], attrs,
            name=node.name, outputs=[node.outputs[0], *presents])
    ed.remove([n for n in (k_cat, v_cat) if n is not None])
    return True


@register("recognize_attention")
def recognize_attention(graph: Graph) -> Graph:
    return rewrite(graph, [(MERGED, _build)], ops=("Reshape",))

