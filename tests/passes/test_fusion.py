"""The fusion passes: which nodes each groups on a canonical llama graph (and which it must
not), that they change no node, that --dump-ir shows the groups, and --no-fuse validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compiler.compile import compile_graph
from kiln.compiler.errors import KilnError
from kiln.compiler.fusions import FUSIONS
from kiln.passes import PIPELINES, get_pass
from kiln.passes.fusion import enabled, pass_name, recorded

MODEL = Path(__file__).parents[1] / "data" / "llama-optimum.onnx"
LAYERS = 2  # llama-optimum's decoder layers


@pytest.fixture(scope="module")
def graph():
    return compile_graph(MODEL, max_seq=64, progress=lambda m: None, weights_optional=True)


def test_every_fusion_has_its_pass_and_each_pass_is_in_a_pipeline():
    for name in FUSIONS:
        assert get_pass(pass_name(name)) is not None
        assert pass_name(name) in PIPELINES["compile"]


@pytest.mark.parametrize(("fusion", "ops", "per_layer"), [
    ("projections", ["linear", "Split"], 2),  # q/k/v and gate/up
    ("norm_linear", ["rms_norm", "linear"], 2),  # into q/k/v and gate/up (+ the LM head)
    ("residual_add", ["linear", "Add"], 2),  # o_proj and down_proj
    ("qkv_rope", ["Split", "rotary", "rotary", "attention"], 1),
    ("qkv_projection", ["linear", "Split"], 1),
    ("swiglu", ["linear", "Split", "silu_mul"], 1),
])
def test_groups_on_a_llama_graph(graph, fusion, ops, per_layer):
    groups = recorded(graph, fusion)
    assert all([n.op for n in g] == ops for g in groups), groups
    head = 1 if fusion == "norm_linear" else 0  # the final norm into the LM head
    assert len(groups) == per_layer * LAYERS + head


def test_swiglu_and_qkv_groups_are_wired_as_recorded(graph):
    for lin, sp, u in recorded(graph, "swiglu"):
        assert sp.inputs[0] == lin.outputs[0] and list(u.inputs[:2]) == list(sp.outputs)
    for sp, rq, rk, a in recorded(graph, "qkv_rope"):
        assert list(a.inputs[:3]) == [rq.outputs[0], rk.outputs[0], sp.outputs[2]]
        assert rq.inputs[1:3] == rk.inputs[1:3]


def test_fusion_passes_change_no_node(graph):
    for name in PIPELINES["fuse"]:
        out = get_pass(name)(graph, enabled=True)
        assert out.nodes == graph.nodes and out.params == graph.params


def test_a_disabled_fusion_records_nothing_and_the_rest_are_unchanged(graph):
    for name in FUSIONS:
        g = compile_graph(MODEL, max_seq=64, progress=lambda m: None, weights_optional=True,
                          fusions=enabled([name]))
        assert not recorded(g, name)
        others = [f for f in FUSIONS if f != name]
        if name not in ("projections", "qkv_rope"):  # the others build on these two
            for f in others:
                assert [[n.name for n in x] for x in recorded(g, f)] == \
                    [[n.name for n in x] for x in recorded(graph, f)], (name, f)


def test_without_projections_no_split_fusion_can_form():
    g = compile_graph(MODEL, max_seq=64, progress=lambda m: None, weights_optional=True,
                      fusions=enabled(["projections"]))
    assert "Split" not in g.op_histogram()
    assert not any(recorded(g, f) for f in ("qkv_rope", "qkv_projection", "swiglu"))


def test_dump_ir_shows_the_groups(tmp_path):
    compile_graph(MODEL, max_seq=64, progress=lambda m: None, weights_optional=True,
                  dump_ir=tmp_path)
    text = (tmp_path / f"{len(PIPELINES['compile']):02d}_fuse_swiglu.txt").read_text()
    for name in FUSIONS:
        assert f"fusion {name}.0: " in text, name
    body = [line for line in text.splitlines() if " = silu_mul(" in line]
    assert body and all("[fusion swiglu." in line for line in body)


def test_no_fuse_names_are_checked():
    assert enabled(["all"]) == ()
    assert enabled(["swiglu"], take=("projections", "swiglu")) == ("projections",)
    with pytest.raises(KilnError, match="--no-fuse nope: unknown fusion"):
        enabled(["nope"])
