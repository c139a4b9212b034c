"""`kiln tune`: candidates are checked against numpy and timed; the table round-trips into
per-shape kernel choices that `kiln compile --tuning` builds with, and a bad table is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.codegen import tune
from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.targets import host_cpu
from kiln.compiler.errors import KilnError

pytestmark = pytest.mark.tvm

DATA = Path(__file__).parent.parent / "data"


def test_tune_times_every_candidate_and_picks_the_fastest(tmp_path):
    target = host_cpu()
    trials = tune.tune([(64, 48)], target, m=20, repeat=1)
    assert {(t.phase, t.config) for t in trials} == (
        {("prefill", c) for c in tune.candidates("prefill")} |
        {("decode", c) for c in tune.candidates("decode")})
    table = tune.best(trials)
    for phase in ("prefill", "decode"):
        entry = table[phase]["64x48"]
        fastest = min(t.seconds for t in trials if t.phase == phase)
        assert entry["seconds"] == fastest > 0
    tune.save(tmp_path / "t.json", table, target, m=20, threads=target.threads)
    configs = tune.load_configs(tmp_path / "t.json")
    chosen = configs["decode"].packed_for(64, 48)
    assert (chosen.mr, chosen.nv) == (table["decode"]["64x48"]["mr"],
                                      table["decode"]["64x48"]["nv"])
    assert configs["prefill"].packed_for(1, 1) == configs["prefill"].packed  # untuned: default


def test_compile_with_a_tuning_table_matches_the_default(tmp_path, rng):
    from kiln.compiler.compile import compile_model
    from kiln.runtime.session import Session

    model = DATA / "llama-optimum.onnx"
    shapes = {"64x64": (4, 6), "256x64": (12, 2), "64x128": (6, 4), "128x64": (8, 3)}
    doc = {"format": tune.FORMAT, "kernel": "packed_linear",
           "prefill": {s: {"mr": mr, "nv": nv} for s, (mr, nv) in shapes.items()},
           "decode": {s: {"mr": 1, "nv": 1} for s in shapes}}
    (tmp_path / "t.json").write_text(json.dumps(doc))
    tuned = Session.load(compile_model(model, tmp_path / "a", max_seq=64,
                                       tuning=tmp_path / "t.json"))
    plain = Session.load(compile_model(model, tmp_path / "b", max_seq=64))
    ids = rng.integers(0, 256, (1, 21))
    want = plain.prefill(ids)
    np.testing.assert_allclose(tuned.prefill(ids), want, rtol=1e-5, atol=1e-5)
    tok = [[int(want[0, -1].argmax())]]
    np.testing.assert_allclose(tuned.decode(tok), plain.decode(tok), rtol=1e-5, atol=1e-5)


def test_bad_tuning_table_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KilnError, match="not a kiln tuning file"):
        tune.load_configs(bad)
    bad.write_text(json.dumps({"format": tune.FORMAT, "kernel": "packed_linear",
                               "prefill": {"64": {"mr": 1, "nv": 1}}}))
    with pytest.raises(KilnError, match="bad prefill entry"):
        tune.load_configs(bad)
    bad.write_text(json.dumps({"format": tune.FORMAT, "kernel": "packed_linear",
                               "decode": {"64x64": {"mr": 40, "nv": 9}}}))
    with pytest.raises((KilnError, ValueError)):
        tune.load_configs(bad)


def test_search_space_is_what_the_kernel_accepts():
    for c in plin.SEARCH_SPACE:
        assert c.mr * c.nv + c.nv + 1 <= 32
