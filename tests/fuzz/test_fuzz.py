"""The fixed-seed fuzz subset CI runs (benchmarks/fuzz.py is the long run): one mutant per fault
kind through inspect, check, compile and run, and one corrupted artifact per artifact fault
through run and verify; no command may crash (traceback, odd exit code, timeout, refusal
without its one error line, partial artifact)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.fuzz.harness import FIXTURES, MAX_SEQ, ForkServer, Fuzzer, foreign_params
from tests.fuzz.mutate import ARTIFACT_MUTATORS, MODEL_MUTATORS, mutate_model
from tests.helpers import error_lines

#: fault kind -> seed. Chosen so that one mutant (nan_inf_weights: infinities are accepted)
#: compiles and runs and the rest are refused before kernels are built (a compile of a tiny
#: fixture takes 20-40 s here); swap_op_type 3 and retype_input 9 crashed before
#: the fixes the long run led to
MODEL_SEEDS = {"drop_node": 0, "rewire_node": 0, "wrong_dims": 0, "truncate_data": 0,
               "oversize_data": 0, "bad_attribute": 0, "swap_op_type": 3,
               "duplicate_output": 0, "odd_opset": 1, "remove_input": 0, "retype_input": 9,
               "nan_inf_weights": 0, "huge_dims": 0, "flip_bytes": 0, "truncate_file": 0}
#: corrupt_manifest 1002 empties the signature's inputs (the VM call then crashed)
ARTIFACT_SEEDS = {**dict.fromkeys(ARTIFACT_MUTATORS, 1000), "corrupt_manifest": 1002}


def test_every_fault_kind_has_a_seed():
    assert set(MODEL_SEEDS) == set(MODEL_MUTATORS)
    assert set(ARTIFACT_SEEDS) == set(ARTIFACT_MUTATORS)


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory):
    server = ForkServer()
    root = tmp_path_factory.mktemp("fuzz")
    base = root / "base"
    rc, timed_out, _, _, err = server.run(["compile", str(FIXTURES[0]), "-o", str(base), "-q",
                                           "--max-seq", str(MAX_SEQ)], root, 900)
    assert rc == 0 and not timed_out, err
    yield Fuzzer(server, base, foreign_params(base, root / "foreign"))
    server.close()


@pytest.mark.parametrize("kind", list(MODEL_SEEDS))
def test_model_mutant_never_crashes(fuzzer, kind, tmp_path):
    what, outcomes = fuzzer.model_mutant(kind, MODEL_SEEDS[kind], tmp_path / "w")
    assert [o.command for o in outcomes] == ["inspect", "check", "compile", "run"]
    crashes = [o for o in outcomes if o.crashed]
    assert not crashes, (what, crashes)
    if kind not in ("nan_inf_weights", "odd_opset"):
        assert outcomes[2].outcome == "refused", (what, outcomes[2])
    if kind == "nan_inf_weights":  # infinities compile and run; kiln check flags the outputs
        assert [o.outcome for o in outcomes] == ["ok", "fail", "ok", "ok"], (what, outcomes)


#: mutants of the long run (session 8) that crashed before their fixes: a Mul swapped for a
#: Reshape (a float "shape" reached the shape rules) and an infinite Pow exponent (the lowering
#: took it for a small whole power)
REGRESSIONS = [("swap_op_type", 36), ("nan_inf_weights", 33)]


@pytest.mark.parametrize(("kind", "seed"), REGRESSIONS)
def test_long_run_crashers_stay_fixed(fuzzer, kind, seed, tmp_path):
    what, outcomes = fuzzer.model_mutant(kind, seed, tmp_path / "w")
    assert not [o for o in outcomes if o.crashed], (what, outcomes)


@pytest.mark.parametrize("kind", list(ARTIFACT_SEEDS))
def test_artifact_mutant_refused_in_one_line(fuzzer, kind, tmp_path):
    what, outcomes = fuzzer.artifact_mutant(kind, ARTIFACT_SEEDS[kind], tmp_path / "w")
    run, verify = outcomes
    assert run.outcome == "refused", (what, run)
    # kiln verify checks files and the parameter table; an edited signature is beyond it (the
    # manifest carries no checksum of itself), and is refused when run calls the kernels
    assert verify.outcome == ("ok" if kind == "corrupt_manifest" else "refused"), (what, verify)


@pytest.mark.parametrize("command", ["check", "compile"])
def test_issue_16_short_initializer_is_one_line_in_a_real_process(tmp_path, command):
    """The report: an initializer's raw data shorter than its dims ended `kiln check` and
    `kiln compile` in a numpy_helper traceback."""
    data, what = mutate_model(FIXTURES[1], "wrong_dims", 0)
    model = tmp_path / "model.onnx"
    model.write_bytes(data)
    args = [command, str(model), "-q"] + (["-o", str(tmp_path / "out")] if command == "compile"
                                         else [])
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    p = subprocess.run([sys.executable, "-m", "kiln.compiler.cli", *args], capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    tensor = what.split()[1]
    assert f"tensor {tensor}: raw data holds" in lines[0] and "need" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
