"""Recognize scaled-dot-product attention over split heads -> attention.

    scores  = (q * sq) @ (kᵀ * sk) * s        (any of the scale factors may be absent, or a Div)
    probs   = softmax(scores + bias)          (optionally guarded: where(isnan(p), 0, p))
    context = merge_heads(probs @ v)

where q, k, v are projections split into heads, k and v may be the KV-cache concatenation
concat(past, new) (their concat outputs become attention's present outputs, also under a Cast
to their own type) and may be repeated across query-head groups (GQA/MQA: unsqueeze, expand,
reshape) or, with a single key/value head, broadcast by the matmuls (Falcon's multi-query).
The scale may also divide scores and mask together, (scores + mask) / c (CodeGen).

The bias subgraph, typically hundreds of mask-building nodes, is classified by evaluating it on
probe inputs: when it equals a causal (optionally sliding-window) and/or padding mask built from
one 2-D input, it disappears into attention's `causal` and `window` attributes and `mask` input;
otherwise it stays as a generic additive `bias`, still exact. A window wider than the longest
probe (32768 keys) would read as plain causal.

Requires: constants folded, linear and rotary recognized. Preserves: the output types, the present
key/value outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

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
# GPT-Neo keeps causal scores by a Where before adding the padding mask
MASKED = Op("Where", Var("keep"), SCORES, Const("fill", scalar=True)) | SCORES
BIASED = Op("Add", MASKED, Var("bias")) | MASKED
# CodeGen scales after adding the mask: (scores + mask) / c is scores / c + mask / c, and a mask
# divided by a positive c is still a mask (a generic bias is not recognized in this form)
POST_SCALED = Op("Div", Op("Add", SCORES, Var("bias")), Const("div_post", scalar=True)) | \
    Op("Mul", Op("Add", SCORES, Var("bias")), Const("mul_post", scalar=True))
PROBS = Op("Softmax", Skip("Cast", BIASED | POST_SCALED), where=axis_is_last())
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


def _cache(m: Matcher, kv: str) -> tuple[str | None, str, list]:
    """(past, new heads, the nodes that produce `kv`) for concat(past, new) along the sequence
    axis, possibly under a Cast that changes nothing (GPT-J casts the concat to its own type)."""
    nodes = []
    cast = m.producer.get(kv)
    if cast is not None and cast.op == "Cast" and \
            m.graph.types[cast.inputs[0]] == m.graph.types[kv] and \
            len(m.users(cast.inputs[0])) == 1 and \
            cast.inputs[0] not in m.graph.outputs:
        nodes, kv = [cast], cast.inputs[0]
    b = m.first(CACHE, kv)
    if b is not None and b["concat"].attrs.get("axis") in (2, -2):
        return b["past"], b["new"], [*nodes, b["concat"]]
    return None, kv, []


# -- mask classification -------------------------------------------------------------------

PROBES = ({"batch": 3, "seq": 4, "past": 3}, {"batch": 2, "seq": 1, "past": 6},
          {"batch": 2, "seq": 5, "past": 0})
#: decode probes of growing length: they show sliding windows (Mistral's 4096, Gemma's 512..4096)
#: that the short probes cannot tell from a plain causal mask, up to 32768 keys or the longest
#: mask that the model can build (a window no shorter than that never binds)
LONG_TOTALS = tuple(2**k for k in range(4, 16))  # 16 .. 32768 keys


def _long_probe(total: int) -> dict:
    return {"batch": 2, "seq": 2, "past": total - 2}


@dataclass(frozen=True)
class MaskKind:
    """What an additive attention bias was found to be: padding `mask` input, causal, window."""

    mask: str | None
    causal: bool
    window: int | None = None


@dataclass(frozen=True)
class Bias:
    """What is done to the scores: `add` added, then entries where `keep` is false replaced by
    `fill` (GPT-Neo's where(causal, scores, min)); `keep` is applied first."""

    add: str | None = None
    keep: str | None = None
    fill: float = 0.0

    @property
    def values(self) -> tuple[str, ...]:
        return tuple(v for v in (self.add, self.keep) if v)

    def total(self, got: dict) -> np.ndarray:
        """The additive bias equivalent (for a fill far below any score)."""
        add = got[self.add] if self.add else np.float32(0)
        return add + np.where(got[self.keep], 0, self.fill) if self.keep else add


def classify_bias(graph: Graph, bias: str | Bias) -> MaskKind | None:
    """The causal / sliding-window / padding mask over one 2-D integer input that the additive
    bias equals on every probe; None when it is anything else."""
    bias = bias if isinstance(bias, Bias) else Bias(add=bias)
    sub, mask = _bias_subgraph(graph, bias.values)
    if sub is None:
        return None
    results = []
    for probe in PROBES:
        got = _evaluate(graph, sub, bias, mask, probe)
        if got is None:
            return None
        results.append((probe, *got))
    results += _long_results(graph, sub, bias, mask)
    window = _window(results)
    hypotheses = [MaskKind(mask, True, window)] if window else []
    hypotheses += [MaskKind(mask, True), MaskKind(mask, False)] + \
        ([MaskKind(None, True)] if mask else [])
    for h in hypotheses:
        if all(_bias_matches(got, probe, feed, h) for probe, feed, got in results):
            return h
    return None


def _long_results(graph: Graph, sub: Graph, bias: Bias, mask: str | None) -> list:
    """Results on long probes, up to the longest total the mask can be built for (found by
    doubling, then bisection)."""
    results, ok, bad = [], 8, None

    def attempt(total: int) -> bool:
        probe = _long_probe(total)
        got = _evaluate(graph, sub, bias, mask, probe)
        if got is None or not _fits(got[1], probe):
            return False
        results.append((probe, *got))
        return True

    for total in LONG_TOTALS:
        if not attempt(total):
            bad = total
            break
        ok = total
    while bad is not None and bad - ok > 1:
        mid = (ok + bad) // 2
        ok, bad = (mid, bad) if attempt(mid) else (ok, mid)
    return results


def _bias_subgraph(graph: Graph, values: tuple[str, ...]) -> tuple[Graph | None, str | None]:
    """The nodes computing `values` as a graph of their own, and the mask input they read."""
    producer, cone, inputs, shape_only = graph.producers(), set(), set(), set()
    for v in values:
        c, i, s = _cone(graph, producer, v)
        cone, inputs, shape_only = cone | c, inputs | i, shape_only | s
    if len(inputs) > 1:
        return None, None
    mask = next(iter(inputs), None)
    if mask is not None:
        t = graph.types[mask]
        if t.rank != 2 or not (t.dtype.is_int or t.dtype.name == "bool"):
            return None, None
    sub = graph.replace(nodes=tuple(n for n in graph.nodes if id(n) in cone),
                        inputs=tuple(inputs | shape_only), outputs=values)
    return sub, mask


def _evaluate(graph: Graph, sub: Graph, bias: Bias, mask: str | None,
              probe: dict) -> tuple[np.ndarray | None, np.ndarray] | None:
    """(the mask fed, the bias computed) on one probe; None where it cannot be evaluated."""
    feeds = {mask: _probe_mask(np.random.default_rng(0), probe)} if mask else {}
    for v in set(sub.inputs) - set(feeds):  # read through Shape only: any data of that shape
        shape = graph.types[v].shape
        if shape is None:
            return None
        try:
            feeds[v] = np.zeros([evaluate_dim(d, probe) for d in shape], graph.types[v].dtype.numpy)
        except KeyError:
            return None
    try:
        return feeds.get(mask), bias.total(run(sub, feeds, bindings=probe))
    except (KilnError, KeyError, ValueError):
        return None


def _fits(got: np.ndarray, probe: dict) -> bool:
    """Whether a bias broadcasts against the scores [b, H, s, past+s] of the probe."""
    b, s, p = probe["batch"], probe["seq"], probe["past"]
    try:
        np.broadcast_to(got, (b, got.shape[1], s, p + s))
    except (ValueError, IndexError):
        return False
    return got.ndim == 4


def _window(results) -> int | None:
    """The sliding window a causal bias shows: the nearest past key it hides from a query
    although neither causality nor padding hides it (None when no key is hidden so)."""
    nearest = None
    for probe, mask, got in results:
        b, s, p = probe["batch"], probe["seq"], probe["past"]
        try:
            full = np.broadcast_to(got, (b, got.shape[1], s, p + s))
        except ValueError:
            return None
        dist = p + np.arange(s)[:, None] - np.arange(p + s)[None, :]  # (s, total)
        open_ = (dist >= 0)[None, None] & ((mask != 0)[:, None, None, :] if mask is not None
                                           else True)
        hidden = np.broadcast_to(open_, full.shape) & (full <= -1e4)
        if hidden.any():
            d = int(np.broadcast_to(dist, full.shape)[hidden].min())
            nearest = d if nearest is None else min(nearest, d)
    return nearest


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


def _bias_matches(got: np.ndarray, probe: dict, mask, kind: MaskKind) -> bool:
    b, s, p = probe["batch"], probe["seq"], probe["past"]
    if got.ndim != 4:
        return False
    try:
        full = np.broadcast_to(got, (b, got.shape[1], s, p + s))
    except ValueError:
        return False
    allowed = np.ones((b, 1, s, p + s), bool)
    if kind.causal:
        j, i = np.arange(p + s)[None, :], p + np.arange(s)[:, None]
        allowed &= (j <= i)[None, None]
        if kind.window:
            allowed &= (j > i - kind.window)[None, None]
    if kind.mask is not None:
        allowed &= (mask != 0)[:, None, None, :]
    allowed = np.broadcast_to(allowed, full.shape)
    return bool(np.all(full[allowed] == 0) and np.all(full[~allowed] <= -1e4))


# -- the rewrite -------------------------------------------------------------------------------

def _heads_of(m: Matcher, value: str):
    heads = split_heads(m, value)
    return heads if heads is not None and heads[3] == 1 else None


def _masking(m: Matcher, b: dict, attrs: dict) -> tuple[str, str] | None:
    """(mask input, generic bias) for attention, setting `causal`/`window` in attrs; None when
    the bias cannot be expressed (a generic bias scaled after it was added)."""
    if "bias" not in b and "keep" not in b:
        return "", ""
    fill = scalar(m, b["fill"]) if "keep" in b else -np.inf
    if fill is None or fill > -1e4:  # a kept score must stay far above a filled one
        return None
    kind = classify_bias(m.graph, Bias(b.get("bias"), b.get("keep"), fill))
    post = b.get("div_post") or b.get("mul_post")
    if (post is not None or "keep" in b) and kind is None:
        return None  # not expressible as attention's additive bias
    if post is not None and not 0 < (scalar(m, post) or 0) <= 100:
        return None
    if kind is None:
        return "", b["bias"]
    attrs["causal"] = kind.causal
    if kind.window:
        attrs["window"] = kind.window
    return kind.mask or "", ""


def _build(ed: GraphEditor, node, b: dict) -> bool:
    m = ed.matcher
    q = _heads_of(m, b["q4"])
    (k_all, gk), (v_all, gv) = _unrepeat(m, b["kx"]), _unrepeat(m, b["vx"])
    (k_past, k_new, k_cat), (v_past, v_new, v_cat) = _cache(m, k_all), _cache(m, v_all)
    k, v = _heads_of(m, k_new), _heads_of(m, v_new)
    if q is None or k is None or v is None or gk != gv or (k_past is None) != (v_past is None):
        return False
    (q_flat, h, d, _), (k_flat, kvh, dk, _), (v_flat, kvh_v, dv, _) = q, k, v
    if gk == 1 and kvh == kvh_v == 1:
        gk = h  # one key/value head broadcast by the matmuls: multi-query (Falcon)
    if h != kvh * gk or kvh != kvh_v or not d == dk == dv:
        return False
    out_shape, q_shape = shape_of(m, node.outputs[0]), shape_of(m, q_flat)
    if out_shape is None or q_shape is None or len(out_shape) != 3 or out_shape[2] != h * d:
        return False
    attrs = {"num_heads": h, "num_kv_heads": kvh, "head_dim": d, "scale": _scale(m, b),
             "causal": False}
    masking = _masking(m, b, attrs)
    if masking is None:
        return False
    presents = [k_all if k_cat else ed.fresh(f"{node.name}:present_k"),
                v_all if v_cat else ed.fresh(f"{node.name}:present_v")]
    ed.emit("attention", [q_flat, k_flat, v_flat, k_past or "", v_past or "", *masking], attrs,
            name=node.name, outputs=[node.outputs[0], *presents])
    ed.remove([*k_cat, *v_cat])
    return True


@register("recognize_attention")
def recognize_attention(graph: Graph) -> Graph:
    return rewrite(graph, [(MERGED, _build)], ops=("Reshape",))

