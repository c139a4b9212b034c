"""Tuned vs untuned SmolLM2-135M on this CPU, fp32 and w4g32 (issue 12's acceptance run).

    python benchmarks/tune_cpu.py --model DIR/model.onnx [--budget-s 600] [--rounds 3]

For each variant: `kiln tune` (timed; per-kernel tuned vs default seconds from the database),
`kiln compile` with and without `--tuning`, then decode and prefill-512 tok/s of both artifacts,
alternating A B A B over `--rounds`, medians side by side. Writes benchmarks/tune_cpu.json.
Export the model first: `kiln models export smollm2 -o DIR`. Run on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from kiln.compiler.compile import compile_model
from kiln.compiler.tuning import tune_model
from kiln.runtime.bundle.bench import bench


def run_variant(model: Path, work: Path, quant: str | None, args) -> dict:
    name = quant or "fp32"
    db = work / f"tuning-{name}.json"
    start = time.perf_counter()
    tune_model(model, db, budget_s=args.budget_s, threads=args.threads, quant=quant,
               progress=lambda m: print(f"  {m}", flush=True))
    tune_s = time.perf_counter() - start
    if not db.exists():
        raise SystemExit(f"{name}: the budget of {args.budget_s:g} s measured no kernel")
    arts = {label: compile_model(model, work / f"{name}-{label}", max_seq=args.max_seq,
                                 quant=quant, tuning=db if label == "tuned" else None,
                                 force=True)
            for label in ("untuned", "tuned")}
    runs: dict[str, dict[str, list[float]]] = {k: {"decode": [], "prefill": []} for k in arts}
    for r in range(args.rounds):
        for label in (("untuned", "tuned") if r % 2 == 0 else ("tuned", "untuned")):
            rep = bench(arts[label], prompt_lens=[args.prompt], decode_len=args.decode,
                        repeat=1, synthetic_weights=None, threads=args.threads)
            for row in rep.rows:
                runs[label][row.phase].append(row.tok_s)
    entries = json.loads(db.read_text())["entries"]
    kernels = [{"kernel": k, "shape": b, "config": e["config"], "seconds": e["seconds"],
                "default_seconds": e["default_seconds"]}
               for k, buckets in entries.items() for b, e in buckets.items()]
    return {"variant": name, "tune_seconds": round(tune_s, 1), "kernels": kernels,
            "tok_s": {label: {phase: statistics.median(v) for phase, v in r.items() if v}
                      for label, r in runs.items()}, "runs": runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/kiln-tune-cpu"))
    p.add_argument("--budget-s", type=float, default=600)
    p.add_argument("--threads", type=int)
    p.add_argument("--max-seq", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default="fp32,w4g32")
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("tune_cpu.json"))
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for v in args.variants.split(","):
        res = run_variant(args.model, args.work, None if v == "fp32" else v, args)
        results.append(res)
        worse = [k for k in res["kernels"] if k["seconds"] > k["default_seconds"]]
        print(f"{res['variant']}: tuned in {res['tune_seconds']} s; "
              f"{len(res['kernels'])} kernels, {len(worse)} slower than default")
        for label, phases in res["tok_s"].items():
            print(f"  {label:8s} " + "  ".join(f"{ph} {t:8.1f} tok/s" for ph, t in
                                                 phases.items()))
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
