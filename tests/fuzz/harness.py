"""The fuzzing harness: a mutant through `kiln inspect`, `check`, `compile` and `run` (or an
artifact mutant through `run` and `verify`), each in its own process with a timeout, and every
outcome classified: ok (exit 0), fail (exit 1), refused (exit 2, one error line) or a crash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.fuzz.mutate import ARTIFACT_MUTATORS, mutate_model

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = sorted((ROOT / "tests" / "data").glob("*-optimum.onnx")) + sorted(
    (ROOT / "tests" / "data").glob("*-dynamo.onnx"))
#: seconds per command; a busy 2-core host compiles a tiny fixture in about 20 s
TIMEOUTS = {"inspect": 120, "check": 180, "compile": 420, "run": 120, "verify": 60}
MAX_SEQ = 64
OK_CODES = {0: "ok", 1: "fail", 2: "refused"}


@dataclass
class Outcome:
    command: str
    outcome: str  # ok | fail | refused | crash:<why>
    rc: int
    seconds: float
    detail: str = ""  # the error line, or what the crash looked like

    @property
    def crashed(self) -> bool:
        return self.outcome.startswith("crash")


class ForkServer:
    """One tests/fuzz/forkserver.py process; `run` is thread-safe (one command at a time)."""

    def __init__(self):
        # the server compiles: it must not inherit the runtime-only switch that importing
        # kiln.runtime in this process (an earlier test) sets in os.environ
        env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
        env.update(PYTHONPATH=str(ROOT), TVM_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz.forkserver"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                                     env=env, text=True)
        self.lock = threading.Lock()
        ready = self.proc.stdout.readline()
        if not ready:
            raise RuntimeError("the fork server did not start")

    def run(self, argv: list[str], cwd: Path, timeout: float) -> tuple[int, bool, float,
                                                                         str, str]:
        out, err = cwd / ".stdout", cwd / ".stderr"
        req = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err),
               "timeout": timeout}
        with self.lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            reply = json.loads(self.proc.stdout.readline())
        text = out.read_text(errors="replace"), err.read_text(errors="replace")
        out.unlink(missing_ok=True)
        err.unlink(missing_ok=True)
        return reply["rc"], reply["timed_out"], reply["seconds"], *text

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _error_lines(stderr: str) -> list[str]:
    """stderr without progress lines ('kiln: [  1.0 s] ...') and run's speed report."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("kiln: [")]


def classify(command: str, rc: int, timed_out: bool, seconds: float, stdout: str,
             stderr: str) -> Outcome:
    if timed_out:
        return Outcome(command, "crash:timeout", rc, seconds, f"killed after {seconds:.0f} s")
    if "Traceback (most recent call last)" in stderr:
        tail = [ln for ln in stderr.splitlines() if ln.strip()][-1:]
        return Outcome(command, "crash:traceback", rc, seconds, tail[0] if tail else "")
    if rc not in OK_CODES:
        return Outcome(command, "crash:exit", rc, seconds, f"exit code {rc}")
    lines = _error_lines(stderr)
    errors = [ln for ln in lines if ln.startswith(("kiln: error:", "Error:", "Usage:"))]
    if rc == 2:
        if not errors or not errors[-1].startswith(("kiln: error:", "Error:")):
            return Outcome(command, "crash:no-error-line", rc, seconds, " | ".join(lines[-3:]))
        return Outcome(command, "refused", rc, seconds, errors[-1])
    return Outcome(command, OK_CODES[rc], rc, seconds, errors[-1] if errors else "")


def _partial_left(out: Path) -> str:
    """What an interrupted or refused compile left beside OUT (staging or old directories)."""
    left = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return ", ".join(left)


def _artifact_problem(out: Path, rc: int) -> str:
    from kiln.compiler.errors import KilnError
    from kiln.runtime.artifact import open_artifact

    left = _partial_left(out)
    if left:
        return f"left behind: {left}"
    if rc != 0:
        return f"{out} exists after a failed compile" if out.exists() else ""
    try:
        open_artifact(out, verify=True)
    except KilnError as e:
        return f"the artifact does not verify: {e}"
    return ""


class Fuzzer:
    """Runs mutants; `base` is a compiled artifact of FIXTURES[0] (artifact mutants copy it)."""

    def __init__(self, server: ForkServer, base: Path, foreign: Path):
        self.server, self.base, self.foreign = server, base, foreign

    def _cmd(self, command: str, argv: list[str], cwd: Path) -> Outcome:
        rc, timed_out, seconds, out, err = self.server.run(argv, cwd, TIMEOUTS[command])
        return classify(command, rc, timed_out, seconds, out, err)

    def model_mutant(self, kind: str, seed: int, work: Path) -> tuple[str, list[Outcome]]:
        """inspect, check, compile and run one ONNX mutant; returns (description, outcomes)."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        src = FIXTURES[seed % len(FIXTURES)]
        data, what = mutate_model(src, kind, seed)
        model = work / "model.onnx"
        model.write_bytes(data)
        results = [self._cmd("inspect", ["inspect", str(model), "--json", "-q"], work),
                   self._cmd("check", ["check", str(model), "-q"], work)]
        art = work / "art"
        compiled = self._cmd("compile", ["compile", str(model), "-o", str(art), "-q",
                                         "--max-seq", str(MAX_SEQ)], work)
        problem = _artifact_problem(art, compiled.rc) if not compiled.crashed else ""
        if problem:
            compiled.outcome, compiled.detail = "crash:partial-artifact", problem
        results.append(compiled)
        if compiled.rc == 0 and not problem:
            results.append(self._run(art, work))
        else:  # no artifact of this model: run a corrupted copy of the base artifact
            results.append(self.artifact_mutant(
                sorted(ARTIFACT_MUTATORS)[seed % len(ARTIFACT_MUTATORS)], seed, work / "bad",
                verify=False)[1][0])
        shutil.rmtree(work, ignore_errors=True)
        return f"{src.name}: {what}", results

    def _run(self, art: Path, work: Path) -> Outcome:
        return self._cmd("run", ["run", str(art), "--prompt-ids", "1,2,3",
                                 "--max-new-tokens", "4"], work)

    def artifact_mutant(self, kind: str, seed: int, work: Path, *,
                        verify: bool = True) -> tuple[str, list[Outcome]]:
        """run (and `kiln verify`) on a copy of the base artifact with one fault."""
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        art = work / "art"
        shutil.copytree(self.base, art)
        what = ARTIFACT_MUTATORS[kind](art, np.random.default_rng(seed), self.foreign)
        results = [self._run(art, work)]
        if verify:
            results.append(self._cmd("verify", ["verify", str(art)], work))
        return what, results


def foreign_params(base: Path, out: Path, seed: int = 7) -> Path:
    """A parameter file of the base artifact's names and shapes but other (seeded) values: what
    a params file from another build of the same architecture looks like."""
    from kiln.runtime.params import read_safetensors, write_safetensors

    out.mkdir(parents=True, exist_ok=True)
    arrays = read_safetensors(base / "params.safetensors")
    rng = np.random.default_rng(seed)
    table = [(n, str(a.dtype), list(a.shape)) for n, a in arrays.items()]

    def array(name: str) -> np.ndarray:
        a = arrays[name]
        return (a + rng.standard_normal(a.shape).astype(a.dtype)) if a.dtype.kind == "f" else a

    write_safetensors(out / "params.safetensors", table, array)
    return out
