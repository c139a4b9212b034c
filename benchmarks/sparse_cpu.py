"""CPU speed of sparse SmolLM2-135M artifacts vs dense, side by side (`kiln bench`, alternated).

    python benchmarks/sparse_cpu.py /work/smollm2/model.onnx --work /tmp/h4b [--rounds 3]
    python benchmarks/sparse_cpu.py ... --work /tmp/avx2 --target cpu:znver3   # AVX2 kernels

Compiles (once, kept in --work) fp32, `--sparsity 0.7`, `--sparsity 0.5`, `--quant w8-rtn` and
`--quant w8-rtn --sparsity 0.5`, all pruned by magnitude (the kernels' speed does not depend on
which method chose the zeros; w8 rounds to nearest, as GPTQ's codes run the same kernels), then
runs `kiln bench` rounds: fp32 vs the fp32 sparse ones, w8 vs w8 sparse, each round alternating
its artifacts (`--repeat` medians inside a round). Prints per-round ratios and their medians;
writes every round's JSON to --work. Run it on a quiet machine: decode is bandwidth-bound.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

BUILDS = {
    "fp32": [],
    "sp70": ["--sparsity", "0.7", "--prune-method", "magnitude"],
    "sp50": ["--sparsity", "0.5", "--prune-method", "magnitude"],
    "w8": ["--quant", "w8-rtn"],
    "w8sp50": ["--quant", "w8-rtn", "--sparsity", "0.5", "--prune-method", "magnitude"],
}
GROUPS = [("fp32", "sp70", "sp50"), ("w8", "w8sp50")]


def build(model: Path, work: Path, target: str) -> None:
    for name, flags in BUILDS.items():
        if not (work / name / "manifest.json").exists():
            subprocess.run(["kiln", "compile", str(model), "-o", str(work / name), "-q",
                            "--target", target, *flags], check=True)


def bench(work: Path, group: tuple[str, ...], out: Path, args) -> dict:
    subprocess.run([*args.nice, "kiln", "bench", *(str(work / a) for a in group), "--threads",
                    str(args.threads), "--prompt-lens", "512", "--decode-len", "64", "--repeat",
                    str(args.repeat), "--json", str(out), "-q"], check=True)
    return json.loads(out.read_text())


def _speeds(result: dict) -> dict[str, dict[str, float]]:
    """engine label -> {"decode": tok/s, "prefill": tok/s} from a `kiln bench --json` file."""
    out: dict[str, dict[str, float]] = {}
    for row in result["rows"]:
        if row["phase"] in ("decode", "prefill"):
            out.setdefault(row["engine"], {})[row["phase"]] = row["tok_s"]
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--target", default="cpu",
                    help="compile for this CPU (cpu:znver3: the AVX2 kernels on any x86 host)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nice", type=int, default=0,
                    help="run kiln bench at this niceness (negative: ahead of other work on a "
                         "shared machine; needs root)")
    args = ap.parse_args(argv)
    args.nice = ["nice", "-n", str(args.nice)] if args.nice else []
    args.work.mkdir(parents=True, exist_ok=True)
    build(args.model, args.work, args.target)
    ratios: dict[str, list[float]] = {}
    for r in range(1, args.rounds + 1):
        for group in GROUPS:
            speeds = _speeds(bench(args.work, group, args.work / f"bench_{group[0]}_{r}.json",
                                   args))
            base = speeds[group[0]]
            for name in group[1:]:
                for phase in ("decode", "prefill"):
                    x = speeds[name][phase] / base[phase]
                    ratios.setdefault(f"{name}/{group[0]} {phase}", []).append(x)
                    print(f"round {r}: {name} {phase} {speeds[name][phase]:.1f} tok/s vs "
                          f"{group[0]} {base[phase]:.1f}: x{x:.2f}", flush=True)
    for key, xs in ratios.items():
        print(f"{key}: median x{statistics.median(xs):.2f} (min {min(xs):.2f}, max "
              f"{max(xs):.2f}, {len(xs)} rounds)")


if __name__ == "__main__":
    main()
