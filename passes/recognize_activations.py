"""Recognize activations: x * sigmoid(x) -> silu, silu(g) * u -> silu_mul (SwiGLU's gating),
erf and tanh GELU formulas (and ONNX's Gelu, FastGelu-style contrib ops) -> gelu, and
gelu(g) * u -> gelu_mul (GeGLU: Gemma's gated MLP).

Requires: constants folded. Preserves: types. The constants of each formula are checked by value
(0.5, sqrt(2), sqrt(2/pi), 0.044715), in any association and multiplication order that the
common exporters produce.
"""

from __future__ import annotations

import math

from kiln.compiler.ir import Graph
from kiln.passes import register
from kiln.passes.patterns import Const, Op, Var
from kiln.passes.rewrite import GraphEditor, rewrite

X = Var("x")
SILU = Op("Mul", X, Op("Sigmoid", X))
SILU_MUL = Op("Mul", SILU, Var("up")) | Op("Mul", Op("silu", X), Var("up"))  # SwiGLU

# erf GELU: 0.5 * x * (1 + erf(x / sqrt(2)))
ERF_ARG = Op("Div", X, Const(value=math.sqrt(2.0), rtol=1e-4)) | \
    Op("Mul", X, Const(value=1.0 / math.sqrt(2.0), rtol=1e-4))
ONE_PLUS_ERF = Op("Add", Op("Erf", ERF_ARG), Const(value=1.0))
HALF = Const(value=0.5)
GELU_ERF = (Op("Mul", Op("Mul", X, HALF), ONE_PLUS_ERF)
            | Op("Mul", Op("Mul", X, ONE_PLUS_ERF), HALF)
            | Op("Mul", X, Op("Mul", ONE_PLUS_ERF, HALF))
            | Op("Div", Op("Mul", X, ONE_PLUS_ERF), Const(value=2.0)))

# tanh GELU: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
CUBE = Op("Pow", X, Const(value=3.0)) | Op("Mul", Op("Mul", X, X), X) | Op("Mul", X, Op("Mul", X,
                                                                                          X))
INNER = Op("Add", X, Op("Mul", CUBE, Const(value=0.044715, rtol=1e-3)))
TANH_ARG = Op("Mul", INNER, Const(value=math.sqrt(2.0 / math.pi), rtol=1e-4))
ONE_PLUS_TANH = Op("Add", Op("Tanh", TANH_ARG), Const(value=1.0))
GELU_TANH = (Op("Mul", Op("Mul", X, HALF), ONE_PLUS_TANH)
             | Op("Mul", Op("Mul", X, ONE_PLUS_TANH), HALF)
             | Op("Mul", X, Op("Mul", ONE_PLUS_TANH, HALF))
             | Op("Mul", HALF, Op("Mul", X, ONE_PLUS_TANH)))

GELU_OP = Op("Gelu", X, name="gelu")
FAST_GELU = Op("com.microsoft.FastGelu", X)
MS_GELU = Op("com.microsoft.Gelu", X)

UP = Var("up")
GELU_MUL_ERF = Op("Mul", GELU_ERF, UP) | Op("Mul", Op("gelu", X, where=lambda m, n: n.attrs.get(
    "approximate", "none") == "none"), UP)
GELU_MUL_TANH = Op("Mul", GELU_TANH, UP) | Op("Mul", Op("gelu", X, where=lambda m, n: n.attrs.get(
    "approximate", "none") == "tanh"), UP)
GELU_MUL_OP = Op("Mul", GELU_OP, UP)


def _act(op: str, **attrs):
    def build(ed: GraphEditor, node, b) -> bool:
        a = dict(attrs)
        if "gelu" in b:
            a["approximate"] = b["gelu"].attrs.get("approximate", "none")
        inputs = [b["x"], b["up"]] if "up" in b else [b["x"]]
        out = ed.types[node.outputs[0]]
        if any(ed.types[v].shape != out.shape or ed.types[v].dtype != out.dtype for v in inputs):
            return False  # elementwise: no broadcasting, no mixed types
        ed.emit(op, inputs, a, name=node.name, outputs=[node.outputs[0]])
        return True

    return build


@register("recognize_activations")
def recognize_activations(graph: Graph) -> Graph:
    return rewrite(graph, [
        (SILU_MUL, _act("silu_mul")),
        (SILU, _act("silu")),
        (GELU_MUL_ERF, _act("gelu_mul", approximate="none")),
        (GELU_MUL_TANH, _act("gelu_mul", approximate="tanh")),
        (GELU_MUL_OP, _act("gelu_mul")),
        (GELU_ERF, _act("gelu", approximate="none")),
        (GELU_TANH, _act("gelu", approximate="tanh")),
        (GELU_OP, _act("gelu")),
        (FAST_GELU, _act("gelu", approximate="tanh")),
        (MS_GELU, _act("gelu", approximate="none")),
    ], ops=("Mul", "Div", "Gelu", "com.microsoft.FastGelu", "com.microsoft.Gelu"))
