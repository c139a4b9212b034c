"""tabulate_positions: rotary tables computed from position_ids become exact table lookups."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.compiler.driver import canonicalize
from kiln.compiler.frontend.feeds import make_feeds
from kiln.compiler.interpreter import run
from kiln.passes import get_pass
from tests.helpers import assert_close

DATA = Path(__file__).parent.parent / "data"


@pytest.mark.parametrize("name", ["llama-optimum", "qwen2-dynamo"])
def test_rope_tables_become_lookups(name, rng):
    g = canonicalize(DATA / f"{name}.onnx").canonical
    g2 = get_pass("eliminate_dead_code")(get_pass("tabulate_positions")(g, max_positions=64))
    assert not {"Cos", "Sin", "MatMul"} & set(g2.op_histogram())
    lookups = [n for n in g2.nodes if n.op == "embedding" and n.inputs[1] == "position_ids"]
    assert len(lookups) == 2  # cos and sin
    assert all(g2.params[n.inputs[0]].type.shape[0] == 64 for n in lookups)
    for batch, seq, past in ((2, 5, 3), (1, 1, 40)):
        feeds = make_feeds(g, batch=batch, seq=seq, past=past, rng=rng, vocab=256)
        want, got = run(g, feeds), run(g2, feeds)
        for k in want:
            assert_close(got[k], want[k], name=k)


def test_models_without_rope_are_unchanged():
    g = canonicalize(DATA / "gpt2-optimum.onnx").canonical
    assert get_pass("tabulate_positions")(g, max_positions=64).nodes == g.nodes
