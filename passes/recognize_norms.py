"""Recognize normalizations: RMSNorm and LayerNorm, decomposed or as ONNX ops -> rms_norm,
layer_norm.

Requires: constants folded (eps, exponents and weights are parameters; reduction axes are
attributes). Preserves: types. Variants recognized by structure: x / sqrt(ms + eps),
x * rsqrt (as 1/sqrt, Reciprocal or Pow -0.5), the square as Pow(x, 2) or x * x, the weight on
either side, optional Casts around the fp32 computation, a missing weight (scale 1) and a bias.
A per-head RMSNorm (Qwen3/Gemma3 q_norm, k_norm: rms_norm over D of the [.., H, D] head view)
becomes rms_norm {group_size=D} on the flat [.., H*D] projection, with the head split re-emitted
after it, so rotary and attention recognition see a plain head split of a flat tensor.
"""

from __future__ import annotations

import numpy as np

from kiln.compiler.ir import Graph, inline_param
from kiln.passes import register
from kiln.passes.patterns import Const, Op, Skip, Var
from kiln.passes.queries import perm_is
from kiln.passes.rewrite import GraphEditor, rewrite


def _last_axis_reduce(m, node) -> bool:
    axes = node.attrs.get("axes")
    if axes is None or node.attrs.get("keepdims", 1) != 1 or len(axes) != 1:
        return False
    return axes[0] == -1 or axes[0] == (m.graph.types[node.inputs[0]].rank or 0) - 1

X = Var("x")
XC = Skip("Cast", X)
SQUARE = Op("Pow", XC, Const(value=2.0)) | Op("Mul", XC, XC)
MEAN_SQUARE = Op("ReduceMean", SQUARE, where=_last_axis_reduce)
VAR_EPS = Op("Add", MEAN_SQUARE, Const("eps", scalar=True))
RSQRT = (Op("Div", Const(value=1.0), Op("Sqrt", VAR_EPS)) | Op("Reciprocal", Op("Sqrt", VAR_EPS))
         | Op("Pow", VAR_EPS, Const(value=-0.5)))
NORMED = Skip("Cast", Op("Mul", XC, RSQRT) | Op("Div", XC, Op("Sqrt", VAR_EPS)))
RMS_NORM = Op("Mul", Const("w"), NORMED) | NORMED

MEAN = Op("ReduceMean", XC, where=_last_axis_reduce)
CENTERED = Op("Sub", XC, MEAN, name="centered")
LN_VAR = Op("ReduceMean", Op("Pow", CENTERED, Const(value=2.0)) | Op("Mul", CENTERED, CENTERED),
            where=_last_axis_reduce)
LN_STD = Op("Sqrt", Op("Add", LN_VAR, Const("eps", scalar=True)))
LN_NORMED = Skip("Cast", Op("Div", CENTERED, LN_STD)
                 | Op("Mul", CENTERED, Op("Reciprocal", LN_STD)))
LN_SCALED = Op("Mul", LN_NORMED, Const("w")) | LN_NORMED
LAYER_NORM = Op("Add", LN_SCALED, Const("b")) | LN_SCALED

LN_OP = Op("LayerNormalization", X, Var("w"), name="ln")
LN_OP_BIAS = Op("LayerNormalization", X, Var("w"), Var("b"), name="ln")
RMS_OP = Op("RMSNormalization", X, Var("w"), name="ln") | \
    Op("SimplifiedLayerNormalization", X, Var("w"), name="ln")


def _weight(ed: GraphEditor, b: dict, key: str, features, dtype, name: str) -> str | None:
    """The [E] weight (or bias) bound under `key`, broadcast from a scalar if need be; a missing
    weight becomes ones, a missing bias stays absent."""
    if key not in b:
        if key == "b":
            return None
        return ed.add_param(inline_param(f"{name}.weight", np.ones(features, dtype.numpy)))
    v = b[key]
    t = ed.types[v]
    shape = tuple(t.shape or ())
    if shape == (features,):
        return v
    if int(np.prod(shape)) == 1 or (len(shape) >= 1 and shape[-1] == features and
                                    int(np.prod(shape)) == features):
        arr = np.broadcast_to(ed.params[v].load().reshape(-1), (features,)).astype(dtype.numpy)
        return ed.add_param(inline_param(f"{name}.{'weight' if key == 'w' else 'bias'}", arr))
    return None


def _norm(op: str):
    def build(ed: GraphEditor, node, b) -> bool:
        x = b["x"]
        xt = ed.types[x]
        out_t = ed.types[node.outputs[0]]
        if xt.shape is None or not isinstance(xt.shape[-1], int) or out_t.dtype != xt.dtype:
            return False
        features = xt.shape[-1]
        w = _weight(ed, b, "w", features, xt.dtype, node.name)
        bias = _weight(ed, b, "b", features, xt.dtype, node.name) if op == "layer_norm" else None
        if w is None or ("b" in b and op == "layer_norm" and bias is None):
            return False
        eps = float(ed.params[b["eps"]].load().reshape(-1)[0]) if "eps" in b else \
            float(b["ln"].attrs.get("epsilon", 1e-5))
        ed.emit(op, [x, w] + ([bias] if bias else []), {"eps": eps}, name=node.name,
                outputs=[node.outputs[0]])
        return True

    return build


def _norm_op(op: str):
    def build(ed, node, b) -> bool:
        if b["ln"].attrs.get("axis", -1) not in (-1, len(ed.types[b["x"]].shape or ()) - 1):
            return False
        return _norm(op)(ed, node, b)

    return build


SPLIT = Op("Reshape", Var("flat"), name="split")
HEAD_NORM = Op("rms_norm", Op("Transpose", SPLIT, name="perm", where=perm_is(0, 2, 1, 3)) | SPLIT,
               Var("w"), name="norm")


def _head_norm(ed: GraphEditor, node, b) -> bool:
    """rms_norm(Reshape(flat -> [.., H, D])) -> Reshape(rms_norm(flat) {group_size=D}), also
    with the heads transposed first (Gemma3: [b, H, s, D])."""
    split, norm = b["split"], b["norm"]
    flat, heads = ed.types[b["flat"]].shape, ed.types[split.outputs[0]].shape
    if "group_size" in norm.attrs or flat is None or heads is None:
        return False
    d = heads[-1]
    if len(heads) != len(flat) + 1 or tuple(heads[:-2]) != tuple(flat[:-1]) or \
            not isinstance(d, int) or not isinstance(heads[-2], int) or \
            flat[-1] != heads[-2] * d or ed.types[b["w"]].shape != (d,):
        return False
    normed = ed.emit("rms_norm", [b["flat"], b["w"]], norm.attrs.updated(group_size=d),
                     name=norm.name)[0]
    if "perm" not in b:
        ed.emit("Reshape", [normed, *split.inputs[1:]], dict(split.attrs), name=split.name,
                outputs=[node.outputs[0]])
        return True
    split4 = ed.emit("Reshape", [normed, *split.inputs[1:]], dict(split.attrs),
                     name=split.name)[0]
    ed.emit("Transpose", [split4], dict(b["perm"].attrs), name=b["perm"].name,
            outputs=[node.outputs[0]])
    return True


@register("recognize_norms")
def recognize_norms(graph: Graph) -> Graph:
    graph = _recognize(graph)
    return rewrite(graph, [(HEAD_NORM, _head_norm)], ops=("rms_norm",))


def _recognize(graph: Graph) -> Graph:
    return rewrite(graph, [
        (RMS_NORM, _norm("rms_norm")),
        (LAYER_NORM, _norm("layer_norm")),
        (LN_OP_BIAS, _norm_op("layer_norm")),
        (LN_OP, _norm_op("layer_norm")),
        (RMS_OP, _norm_op("rms_norm")),
    ], ops=("Mul", "Div", "Add", "Cast", "LayerNormalization", "RMSNormalization",
            "SimplifiedLayerNormalization"))

