"""The long fuzz run of issue 16: seeded mutants of the test fixtures through `kiln inspect`,
`check`, `compile` and `run` (and corrupted artifacts through `run` and `verify`), every command
in its own process under a timeout; counts per fault kind and outcome.

    python benchmarks/fuzz.py --mutants 1000 --workers 2 --out out/fuzz      # resumable
    python benchmarks/fuzz.py --out out/fuzz --report                        # the tables

Results go to OUT/results.jsonl, one mutant per line, as each finishes: a second invocation
with the same OUT skips the mutants already there (a killed run resumes), and several workers
(one fork server each) share the queue. A crash is a traceback, an exit code outside {0, 1, 2},
a timeout, a refusal without its one error line, or a partial artifact left by compile.
"""

from __future__ import annotations

import argparse
import collections
import json
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.harness import FIXTURES, MAX_SEQ, ForkServer, Fuzzer, foreign_params
from tests.fuzz.mutate import ARTIFACT_MUTATORS, MODEL_MUTATORS

MODEL_KINDS = list(MODEL_MUTATORS)
ARTIFACT_KINDS = list(ARTIFACT_MUTATORS)


def plan(mutants: int, artifact_mutants: int) -> list[tuple[str, str, int]]:
    """(id, kind, seed): the artifact faults, then the model fault kinds in turn."""
    jobs = [(f"a{i}", ARTIFACT_KINDS[i % len(ARTIFACT_KINDS)], 1000 + i // len(ARTIFACT_KINDS))
            for i in range(artifact_mutants)]  # seconds each: first
    return jobs + [(f"m{i}", MODEL_KINDS[i % len(MODEL_KINDS)], i // len(MODEL_KINDS))
                   for i in range(mutants)]


def _base(server: ForkServer, out: Path) -> Path:
    base = out / "base"
    if not (base / "manifest.json").is_file():
        rc, _timed_out, _, _, err = server.run(
            ["compile", str(FIXTURES[0]), "-o", str(base), "-q", "--force", "--max-seq",
             str(MAX_SEQ)], out, 900)
        if rc != 0:
            raise SystemExit(f"cannot compile the base artifact: {err.strip()[-500:]}")
    return base


def run(out: Path, mutants: int, artifact_mutants: int, workers: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {json.loads(line)["id"] for line in results.open()} if results.exists() else set()
    todo = [j for j in plan(mutants, artifact_mutants) if j[0] not in done]
    print(f"{len(done)} mutants done, {len(todo)} to go, {workers} workers", flush=True)
    jobs: queue.Queue = queue.Queue()
    for j in todo:
        jobs.put(j)
    lock = threading.Lock()
    servers = [ForkServer() for _ in range(workers)]
    base = _base(servers[0], out)
    foreign = foreign_params(base, out / "foreign")
    start = time.monotonic()
    count = [0]

    def work(k: int) -> None:
        fuzz = Fuzzer(servers[k], base, foreign)
        while True:
            try:
                mid, kind, seed = jobs.get_nowait()
            except queue.Empty:
                return
            where = out / "work" / f"w{k}"
            if mid.startswith("m"):
                what, outcomes = fuzz.model_mutant(kind, seed, where)
            else:
                what, outcomes = fuzz.artifact_mutant(kind, seed, where)
            row = {"id": mid, "kind": kind, "seed": seed, "what": what,
                   "outcomes": [o.__dict__ for o in outcomes]}
            with lock:
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                count[0] += 1
                crashes = [o for o in outcomes if o.crashed]
                if crashes or count[0] % 10 == 0:
                    print(f"[{time.monotonic() - start:7.0f} s] {count[0]}/{len(todo)} {mid} "
                          f"{kind}: " + ", ".join(f"{o.command}={o.outcome}" for o in outcomes)
                          + (f"  CRASH {crashes[0].detail}" if crashes else ""), flush=True)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in servers:
        s.close()


def report(out: Path) -> str:
    """Markdown tables: per fault kind, each command's outcomes; then the crashes."""
    rows = [json.loads(line) for line in (out / "results.jsonl").open()]
    counts: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter)
    mutants = collections.Counter()
    crashes = []
    for r in rows:
        mutants[r["kind"]] += 1
        for o in r["outcomes"]:
            counts[r["kind"], o["command"]][o["outcome"]] += 1
            if o["outcome"].startswith("crash"):
                crashes.append((r["id"], r["kind"], o["command"], o["outcome"], o["detail"]))
    model = [r for r in rows if r["id"].startswith("m")]
    lines = [f"{len(model)} model mutants x 4 commands ({sum(len(r['outcomes']) for r in model)}"
             f" commands), {len(rows) - len(model)} artifact mutants x (run, verify); "
             f"{len(crashes)} crashes", "",
             "| fault kind | mutants | command | ok | fail (exit 1) | refused (exit 2) | crash |",
             "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for kind in [*MODEL_KINDS, *ARTIFACT_KINDS]:
        for cmd in ("inspect", "check", "compile", "run", "verify"):
            c = counts.get((kind, cmd))
            if not c:
                continue
            crash = sum(v for k, v in c.items() if k.startswith("crash"))
            lines.append(f"| {kind} | {mutants[kind]} | {cmd} | {c['ok']} | {c['fail']} | "
                         f"{c['refused']} | {crash} |")
    for c in crashes[:20]:
        lines.append(f"- crash {c}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/fuzz"))
    p.add_argument("--mutants", type=int, default=1000, help="ONNX mutants (x 4 commands)")
    p.add_argument("--artifact-mutants", type=int, default=120,
                   help="corrupted artifacts (x run, verify)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--report", action="store_true", help="print the tables of OUT and exit")
    a = p.parse_args()
    if not a.report:
        run(a.out, a.mutants, a.artifact_mutants, a.workers)
    print(report(a.out))


if __name__ == "__main__":
    main()
