"""`kiln tune`: every CPU schedule config computes what its default computes; a tiny model's
tuning writes a database, resumes, respects its budget, and `kiln compile --tuning` builds with it
(same tokens); a foreign or old database is ignored or refused; a tuning bundle is measured by
the runtime alone and its database is accepted."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.codegen import tune
from kiln.codegen.schedules import Choice, bucket, space
from kiln.codegen.targets import host_cpu
from kiln.compiler.errors import KilnError
from kiln.runtime import tune as measuring

pytestmark = pytest.mark.tvm

DATA = Path(__file__).parent.parent / "data"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
#: small instances of every CPU space, both phases (m rows: prefill 20, decode 1)
_LIN = {"n": 40, "k": 48, "bias": True, "dtype": "float32"}
_PACKED = {"n": 64, "k": 48, "block": 16, "bias": True, "dtype": "float32"}
_ATT = {"heads": 4, "kv_heads": 2, "head_dim": 16, "scale": 0.25, "causal": True,
        "masked": True, "dtype": "float32", "mask_dtype": "int64", "q8": False, "window": 0}
INSTANCES = [
    ("cpu.linear", {"phase": "prefill", "m": 20, **_LIN}),
    ("cpu.linear", {"phase": "decode", "m": 1, **_LIN}),
    ("cpu.packed_linear", {"phase": "prefill", "m": 20, **_PACKED}),
    ("cpu.packed_linear", {"phase": "decode", "m": 1, **_PACKED}),
    ("cpu.quant_linear", {"phase": "prefill", "m": 20, "n": 48, "k": 64, "bits": 4,
                          "group": 32, "zp": True, "bias": False}),
    ("cpu.quant_linear", {"phase": "decode", "m": 1, "n": 40, "k": 64, "bits": 8,
                          "group": 32, "zp": False, "bias": True}),
    ("cpu.sparse_linear", {"phase": "prefill", "m": 20, "n": 32, "k": 48, "capacity": 400,
                           "values": "float32", "bias": False}),
    ("cpu.sparse_linear", {"phase": "decode", "m": 1, "n": 32, "k": 48, "capacity": 400,
                           "values": "int8", "bias": True}),
    ("cpu.attention", {"phase": "prefill", "s": 20, "past": 0, **_ATT}),
    ("cpu.attention", {"phase": "decode", "s": 1, "past": 20, **_ATT}),
    ("cpu.attention", {"phase": "decode", "s": 1, "past": 20, **_ATT, "q8": True}),
    ("cpu.rowwise", {"phase": "prefill", "op": "rms_norm", "e": 48, "m": 20,
                     "dtype": "float32"}),
    ("cpu.rowwise", {"phase": "decode", "op": "binary:Add", "e": 48, "m": 1,
                     "dtype": "float32"}),
    ("cpu.rowwise", {"phase": "prefill", "op": "unary:silu", "e": 48, "m": 20,
                     "dtype": "float32"}),
]


def _measurable(kernel: str) -> bool:
    """The sparse kernels need AVX-512: on an AVX2 host LLVM aborts on them ("Do not know how
    to split the result of this operator"; tests/codegen/test_sparse_linear.py aborts too)."""
    return kernel != "cpu.sparse_linear" or host_cpu().vector_bits >= 512


def _choice(kernel: str, shape: dict) -> Choice:
    sp = space(kernel)
    return Choice(kernel, bucket(shape, sp.dynamic), {}, "default", shape)


def test_every_cpu_config_matches_its_default(tmp_path):
    """Each instance's candidates (all valid configs, at most 12 spread evenly over a larger
    space) write outputs within 1e-4 relative error of the default's on seeded random inputs:
    the measuring harness checks them before timing and rejects none."""
    target = host_cpu()
    cases = [(k, s) for k, s in INSTANCES if _measurable(k)]
    plan = tune.write_plan([_choice(k, s) for k, s in cases], target, tmp_path / "plan")
    assert len(plan["instances"]) == len(cases)
    assert {i["kernel"] for i in plan["instances"]} == {k for k, _ in cases}
    assert all(i["tolerance"] == 1e-4 for i in plan["instances"])
    entries = measuring.measure(tmp_path / "plan", tmp_path / "t.json", repeat=1)
    for kernel, shape in cases:
        r = entries[kernel][bucket(shape, space(kernel).dynamic)]
        assert r["rejected"] == [], (kernel, shape)
        assert r["checked"] == r["candidates"] >= 2, (kernel, shape)
        assert r["seconds"] <= r["default_seconds"]


def test_a_wrong_candidate_is_rejected_not_timed(tmp_path):
    """A candidate whose output differs from the default's is left out of the race."""
    target = host_cpu()
    found = [_choice("cpu.rowwise", INSTANCES[-2][1])]
    tune.write_plan(found, target, tmp_path)
    plan = json.loads((tmp_path / tune.PLAN).read_text())
    plan["instances"][0]["tolerance"] = -1.0  # nothing can match
    (tmp_path / tune.PLAN).write_text(json.dumps(plan))
    r = next(iter(measuring.measure(tmp_path, tmp_path / "t.json", repeat=1)["cpu.rowwise"]
                  .values()))
    assert r["checked"] == 1 and len(r["rejected"]) == 1
    assert r["config"] == {"parallel": False}  # the default: decode runs on one thread


def test_candidate_error_is_the_whole_outputs_relative_error(monkeypatch):
    """The chunked check is max |got - want| / max |want| over whole outputs (float64 to 1e-6),
    chunk boundaries and float16 included; a NaN anywhere in a candidate's output fails it."""
    monkeypatch.setattr(measuring, "ERROR_CHUNK", 1000)
    rng = np.random.default_rng(3)
    want = [rng.standard_normal((7, 613)).astype(np.float32),
            rng.standard_normal(2500).astype(np.float16)]
    got = [w + (rng.standard_normal(w.shape) * 1e-3).astype(w.dtype) for w in want]
    got[1][2400] += 5  # the largest difference sits in the last, partial chunk

    def direct(w, g):
        w, g = w.astype(np.float64), g.astype(np.float64)
        return np.abs(g - w).max() / np.abs(w).max()

    expect = max(direct(w, g) for w, g in zip(want, got, strict=True))
    assert measuring._error(want, got) == pytest.approx(expect, rel=1e-6)
    got[0][3, 17] = np.nan
    assert np.isnan(measuring._error(want, got))


@pytest.fixture
def probed(tmp_path, monkeypatch) -> Path:
    """A plan of one CPU decode attention instance (20 cached tokens, 3 candidates) whose space
    gives it a probe at 60 cached tokens."""
    import dataclasses

    from kiln.codegen import schedules

    kernel, shape = INSTANCES[9]
    sp = dataclasses.replace(space(kernel), probes=lambda s: [{**s, "past": 60}])
    monkeypatch.setitem(schedules.SPACES, kernel, sp)
    tune.write_plan([_choice(kernel, shape)], host_cpu(), tmp_path, max_candidates=3)
    return tmp_path


def test_a_probe_measures_the_same_kernels_at_another_shape(probed):
    """The probe's arguments are the instance's with caches for 60 cached tokens; every
    candidate is checked and timed there too, and the entry reports the winner's gain there."""
    inst = json.loads((probed / tune.PLAN).read_text())["instances"][0]
    (probe,) = inst["probes"]
    assert probe["shape"]["past"] == 60 and inst["shape"]["past"] == 20
    assert [a.get("shape") for a in inst["args"]][1:4] == [[1, 2, 21, 16]] * 2 + [[1, 21]]
    assert [a.get("shape") for a in probe["args"]][1:4] == [[1, 2, 61, 16]] * 2 + [[1, 61]]
    assert probe["args"][4] == {"scalar": 60, "dtype": "int64"}
    (r,) = measuring.measure(probed, probed / "t.json", repeat=1)["cpu.attention"].values()
    assert r["checked"] == r["candidates"] == 3 and r["rejected"] == []
    assert [p["shape"]["past"] for p in r["probes"]] == [60] and r["probes"][0]["gain"] > 0


@pytest.mark.parametrize(("times", "winner"), [
    ([[10, 5, 9], [10, 11, 9]], 2),   # 1 is 2x at 20 tokens but 10% slower at 60: 2 wins
    ([[10, 5, 9], [10, 10.1, 9.9]], 1),  # 1 within 2% at the probe, best on the mean
    ([[10, 9.9, 9.8], [10, 9.9, 9.8]], 0),  # none 3% faster: the default stays
])
def test_a_candidate_wins_only_where_it_is_no_slower_at_any_probe(probed, monkeypatch,
                                                                   times, winner):
    calls = iter(t for row in times for t in row)  # the timing order: per argument set
    monkeypatch.setattr(measuring, "_time", lambda *a: next(calls) * 1e-6)
    plan = json.loads((probed / tune.PLAN).read_text())
    (r,) = measuring.measure(probed, probed / "t.json", repeat=1)["cpu.attention"].values()
    assert r["config"] == plan["instances"][0]["candidates"][winner]["config"]
    assert r["seconds"] == pytest.approx(times[0][winner] * 1e-6)
    assert r["default_seconds"] == pytest.approx(1e-5)
    assert r["probes"][0]["gain"] == pytest.approx(times[1][0] / times[1][winner])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> tuple[Path, list[str]]:
    """A tiny model's tuning database and the progress lines of writing it."""
    from kiln.compiler.tuning import tune_model

    out, lines = tmp_path_factory.mktemp("tune") / "t.json", []
    tune_model(DATA / "llama-optimum.onnx", out, max_seq=64, max_candidates=3, repeat=1,
               progress=lines.append)
    return out, lines


def test_tune_writes_a_database_keyed_by_target(tuned):
    from kiln.codegen.schedules import TuningDB, target_key

    out, lines = tuned
    db = TuningDB.load(out)
    assert db.target == target_key(host_cpu())
    assert {"cpu.packed_linear", "cpu.attention", "cpu.rowwise"} <= set(db.entries)
    for buckets in db.entries.values():
        for entry in buckets.values():
            assert entry["seconds"] <= entry["default_seconds"]
    assert any("phase=decode" in b for b in db.entries["cpu.packed_linear"])
    assert any("built 3 candidates of cpu.packed_linear" in m for m in lines)


def test_tune_resumes_and_respects_its_budget(tuned, tmp_path):
    from kiln.compiler.tuning import tune_model

    out, _ = tuned
    before, lines = out.read_text(), []
    tune_model(DATA / "llama-optimum.onnx", out, max_seq=64, max_candidates=3, repeat=1,
               progress=lines.append)
    assert not any("built" in m for m in lines)  # every instance was measured already
    assert out.read_text() == before
    lines = []
    tune_model(DATA / "llama-optimum.onnx", tmp_path / "b.json", max_seq=64, budget_s=0,
               progress=lines.append)
    assert any("budget" in m for m in lines)
    assert not (tmp_path / "b.json").exists()


def _greedy(artifact: Path) -> list[int]:
    from kiln.runtime.generate import generate
    from kiln.runtime.session import Session

    return list(generate(Session.load(artifact), [1, 5, 9, 3], max_new_tokens=8))


def test_compile_with_tuning_uses_it_and_generates_the_same_tokens(tuned, tmp_path):
    from kiln.compiler.compile import compile_model

    out, _ = tuned
    plain = compile_model(DATA / "llama-optimum.onnx", tmp_path / "plain", max_seq=64)
    fast = compile_model(DATA / "llama-optimum.onnx", tmp_path / "tuned", max_seq=64,
                         tuning=out)
    sources = [c["source"] for c in json.loads((fast / "manifest.json").read_text())["schedules"]]
    assert "tuned" in sources
    assert _greedy(fast) == _greedy(plain)


def test_a_foreign_database_is_ignored_with_one_warning(tuned, tmp_path):
    from kiln.compiler.compile import compile_model

    doc = json.loads(tuned[0].read_text())
    doc["target"]["kiln"] = "0.0.0-other"
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(doc))
    with pytest.warns(UserWarning, match="kiln '0.0.0-other'") as seen:
        art = compile_model(DATA / "llama-optimum.onnx", tmp_path / "a", max_seq=64,
                            tuning=stale)
    assert len([w for w in seen if "tuning" in str(w.message) or "measured" in
                str(w.message)]) == 1
    assert "\n" not in str(seen[0].message)
    sources = {c["source"] for c in json.loads((art / "manifest.json").read_text())["schedules"]}
    assert sources == {"default"}


def test_an_old_format_file_is_refused_in_one_line(tmp_path):
    from kiln.compiler.compile import compile_model

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": 1, "kernel": "packed_linear", "decode": {}}))
    with pytest.raises(KilnError, match=r"format 1.*re-run `kiln tune`") as e:
        compile_model(DATA / "llama-optimum.onnx", tmp_path / "a", max_seq=64, tuning=old)
    assert "\n" not in str(e.value)


def _numpy_only(tmp_path: Path) -> Path:
    site = tmp_path / "host-site"
    site.mkdir()
    src = Path(next(iter(importlib.util.find_spec("numpy").submodule_search_locations)))
    for name in ("numpy", "numpy.libs"):
        if (src.parent / name).exists():
            (site / name).symlink_to(src.parent / name)
    return site


def test_a_cpu_tuning_bundle_is_measured_by_the_runtime_alone(tmp_path):
    """`kiln tune --bundle` then `kiln_run.py tune` where only Python and numpy exist
    (runtime-only TVM); `kiln compile` accepts the database it writes."""
    from kiln.compiler.compile import compile_model
    from kiln.compiler.tuning import tune_model

    bundle = tune_model(DATA / "llama-optimum.onnx", bundle=tmp_path / "b", max_seq=64,
                        max_candidates=2, python=PYTHON)
    assert (bundle / "tuning" / "plan.json").is_file()
    assert not list(bundle.rglob("libtvm_compiler.so"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "PYTHONPATH": str(_numpy_only(tmp_path)), "TVM_USE_RUNTIME_LIB": "1"}
    db = tmp_path / "t.json"
    p = subprocess.run([sys.executable, "-S", str(bundle / "kiln_run.py"), "tune", "-o",
                        str(db), "--repeat", "1"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "already measured" in p.stderr
    art = compile_model(DATA / "llama-optimum.onnx", tmp_path / "a", max_seq=64, tuning=db)
    sources = [c["source"] for c in json.loads((art / "manifest.json").read_text())["schedules"]]
    assert "tuned" in sources


@pytest.mark.skipif(not _measurable("cpu.sparse_linear"), reason="sparse kernels need AVX-512")
def test_tune_only_some_kernels_of_a_pruned_model(tmp_path):
    """`--sparsity 0.7 --only cpu.sparse_linear`: the sparse GEMV/GEMM instances of the pruned
    model and nothing else; a family the target has not, or the model has not, is refused."""
    from kiln.compiler.tuning import tune_model

    db = tune_model(DATA / "llama-optimum.onnx", tmp_path / "t.json", max_seq=64,
                    sparsity="0.7", only=("cpu.sparse_linear",), max_candidates=2, repeat=1)
    entries = json.loads(db.read_text())["entries"]
    assert list(entries) == ["cpu.sparse_linear"]
    assert {b.split("phase=")[1].split(",")[0] for b in entries["cpu.sparse_linear"]} == {
        "decode", "prefill"}
    with pytest.raises(KilnError, match=r"--only cuda\.gemv: no such kernel family for cpu"):
        tune_model(DATA / "llama-optimum.onnx", tmp_path / "u.json", only=("cuda.gemv",))
    with pytest.raises(KilnError, match=r"the model has no cpu\.sparse_linear kernel"):
        tune_model(DATA / "llama-optimum.onnx", tmp_path / "u.json",
                   only=("cpu.sparse_linear",))


def test_tuning_a_gpu_target_here_needs_a_bundle(tmp_path):
    from kiln.compiler.tuning import tune_model

    with pytest.raises(KilnError, match="--bundle"):
        tune_model(DATA / "llama-optimum.onnx", tmp_path / "t.json", target="cuda")
    with pytest.raises(KilnError, match=r"-o TUNING\.json"):
        tune_model(DATA / "llama-optimum.onnx")


def test_candidates_keep_the_default_first_and_respect_the_cap():
    target = host_cpu()
    shape = INSTANCES[0][1]
    every = space("cpu.linear").configs(shape, target)
    picked = tune.candidates(space("cpu.linear"), shape, target, cap=5)
    assert len(every) > 5 and len(picked) == 5 and picked[0] == every[0]
    assert all(c in every for c in picked)
    assert np.unique([json.dumps(c, sort_keys=True) for c in picked]).size == 5


def test_each_tuned_prompt_length_gets_its_prefill_entry(tmp_path):
    """A database measured at two prompt lengths compiles to prefill entries per length; the
    runtime runs the nearest one, with the logits and tokens of the untuned artifact."""
    from kiln.codegen.schedules import TuningDB
    from kiln.compiler.compile import compile_model
    from kiln.compiler.tuning import tune_model
    from kiln.runtime.session import Session, row_entry

    db = tune_model(DATA / "llama-optimum.onnx", tmp_path / "t.json", max_seq=64, rows=(8, 64),
                    max_candidates=2, repeat=1)
    assert TuningDB.load(db).prefill_rows() == {8, 64}
    art = compile_model(DATA / "llama-optimum.onnx", tmp_path / "a", max_seq=64, tuning=db)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["prefill_rows"] == [64, 8]
    assert {"prefill_8", "prefill_last_8"} <= set(manifest["entry_points"])
    assert [row_entry("prefill", n, [64, 8]) for n in (3, 8, 20, 40, 64)] == [
        "prefill_8", "prefill_8", "prefill", "prefill", "prefill"]  # 20 -> 32: a tie, larger
    plain = compile_model(DATA / "llama-optimum.onnx", tmp_path / "p", max_seq=64)
    ids = np.random.default_rng(0).integers(0, 100, (1, 6))
    short = Session.load(art).prefill(ids)
    np.testing.assert_allclose(short, Session.load(plain).prefill(ids), rtol=1e-4, atol=1e-4)
    assert _greedy(art) == _greedy(plain)


def test_row_entry_keeps_single_bucket_artifacts_and_decode_as_they_are():
    from kiln.runtime.session import row_entry

    assert row_entry("prefill", 2000, [512]) == "prefill"
    assert row_entry("decode", 1, [512, 2048]) == "decode"
    assert row_entry("prefill_last", 1500, [512, 2048]) == "prefill_last_2048"
    assert row_entry("prefill_last", 700, [512, 2048]) == "prefill_last_2048"  # 1024: a tie
    assert row_entry("prefill_last", 300, [512, 2048]) == "prefill_last"


def test_tune_rows_outside_the_context_are_refused(tmp_path):
    from kiln.compiler.tuning import tune_model

    with pytest.raises(KilnError, match=r"--rows 8,128: .*1\.\.64"):
        tune_model(DATA / "llama-optimum.onnx", tmp_path / "t.json", max_seq=64, rows=(8, 128))


def test_decode_runs_the_entry_scheduled_for_the_nearest_context():
    """CUDA artifacts whose attention splits long contexts have `decode` (scheduled at 128
    cached tokens) and `decode_1024`; the runtime picks by the longest row's cached length,
    the nearer on a log scale (the switch at about 362), ties to the longer."""
    from kiln.runtime.session import context_entry

    assert [context_entry("decode", c, [128, 1024]) for c in (0, 16, 300, 362, 363, 4000)] == [
        "decode", "decode", "decode", "decode", "decode_1024", "decode_1024"]
    assert context_entry("decode", 5000, []) == "decode"  # one decode entry (CPU, old CUDA)
    assert context_entry("prefill_8", 5000, [128, 1024]) == "prefill_8"
