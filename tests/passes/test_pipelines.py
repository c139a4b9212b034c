"""The compile pipeline: quantization and weight layouts are stages the driver runs, verifies,
dumps and times like every other pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compiler.compile import compile_graph
from kiln.compiler.driver import canonicalize
from kiln.compiler.errors import KilnError
from kiln.passes import PASSES, PIPELINES, PassContext, run_pipeline
from kiln.passes.quantize import parse_preset

MODEL = Path(__file__).parents[1] / "data" / "llama-optimum.onnx"
STAGES = ["quantize_kv_cache", "quantize_weights", "pack_linear_weights"]


def test_compile_pipeline_ends_with_the_quantization_stages_then_the_fusions():
    names = PIPELINES["compile"]
    assert names[:len(PIPELINES["canonicalize"])] == PIPELINES["canonicalize"]
    stages = names[len(names) - len(PIPELINES["fuse"]) - len(PIPELINES["quantize"]):]
    assert stages == PIPELINES["quantize"] + PIPELINES["fuse"]
    # prune before, sparsify between quantizing and packing: the order of these three is fixed
    positions = [PIPELINES["quantize"].index(s) for s in STAGES]
    assert positions == sorted(positions)


def test_stages_are_dumped_timed_and_verified(tmp_path):
    said: list[str] = []
    g = compile_graph(MODEL, max_seq=64, progress=said.append, weights_optional=False,
                      pack_block=16, quant=parse_preset("w4g32-kv8-rtn"), dump_ir=tmp_path)
    dumps = sorted(p.name for p in tmp_path.iterdir())
    assert dumps[0] == "00_input.txt"
    ran = [d[3:-4] for d in dumps[1:]]
    assert ran == PIPELINES["compile"], ran
    text = {s: (tmp_path / d).read_text() for s, d in zip(ran, dumps[1:], strict=True)}
    assert "kv_bits" in text["quantize_kv_cache"] and "quant_linear" not in \
        text["quantize_kv_cache"]
    assert "layout='nk'" in text["quantize_weights"]
    assert "layout='blocked'" in text["pack_linear_weights"]
    assert "layout='nk'" not in text["pack_linear_weights"]
    for stage in STAGES:  # timed: the progress line carries the seconds
        assert any(m.startswith(f"{stage}: ") and m.endswith(" s)") for m in said), stage
    hist = g.op_histogram()
    assert hist["quant_linear"] > 0 and "linear" not in hist
    assert all(n.attrs["kv_bits"] == 8 for n in g.nodes if n.op == "attention")


def test_stages_without_options_change_nothing():
    later = PIPELINES["quantize"] + PIPELINES["fuse"]
    base = canonicalize(MODEL, pipeline=PIPELINES["compile"][:-len(later)],
                        options={"tabulate_positions": {"max_positions": 64}})
    full = canonicalize(MODEL, pipeline="compile",
                        options={"tabulate_positions": {"max_positions": 64}})
    assert full.canonical.dump() == base.canonical.dump()
    assert [t[0] for t in full.timings][-len(later):] == later


def test_a_stage_that_breaks_the_graph_is_caught_by_the_driver(monkeypatch):
    """A new stage is one name in PIPELINES["quantize"]; the driver verifies what it returns."""

    def bad_stage(graph, *, factor: int = 1):
        node = next(n for n in graph.nodes if n.op == "quant_linear")
        t = graph.types[node.outputs[0]]
        types = {**graph.types, node.outputs[0]: t.__class__(t.dtype, (*t.shape[:-1], 3))}
        return graph.replace(types=types)

    monkeypatch.setitem(PASSES, "h3_bad_stage", bad_stage)
    g = canonicalize(MODEL, pipeline="canonicalize").canonical
    stages = ["quantize_weights", "h3_bad_stage", "pack_linear_weights"]
    with pytest.raises(KilnError, match=r"quant_linear\): output .* is declared"):
        run_pipeline(g, stages, PassContext(verify=True),
                     quantize_weights={"preset": parse_preset("w8")}, h3_bad_stage={"factor": 2})
