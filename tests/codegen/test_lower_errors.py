"""A lowering that trips over its input is one line naming the node, op and target (fuzz m280)."""

from types import SimpleNamespace

import pytest

pytest.importorskip("tvm")

from kiln.codegen import lower
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Attrs, Node


def _unreadable_shape(ctx, node):
    return list(None.values)  # what shape_of meets on an input of unknown shape


def test_lowering_failure_names_node_op_and_target(monkeypatch):
    monkeypatch.setitem(lower.LOWERINGS, "layer_norm", _unreadable_shape)
    node = Node("layer_norm", ("x", "g", "b"), ("y",), Attrs(), "h.0.ln_1")
    ctx = SimpleNamespace(target=SimpleNamespace(name="cpu"), values={})
    with pytest.raises(KilnError) as e:
        lower.lower_node(ctx, node)
    msg = str(e.value)
    assert "\n" not in msg
    assert "h.0.ln_1" in msg and "layer_norm" in msg and "cpu" in msg
    assert "AttributeError" in msg


def test_kiln_errors_from_a_lowering_pass_through(monkeypatch):
    def refuses(ctx, node):
        raise KilnError("node n: head_dim 7 is not supported")

    monkeypatch.setitem(lower.LOWERINGS, "layer_norm", refuses)
    node = Node("layer_norm", ("x",), ("y",), Attrs(), "n")
    ctx = SimpleNamespace(target=SimpleNamespace(name="cpu"), values={})
    with pytest.raises(KilnError, match=r"head_dim 7 is not supported$"):
        lower.lower_node(ctx, node)
