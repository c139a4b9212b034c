"""`kiln run` with its default thread count against explicit ones, alternated in one run.

    python benchmarks/threads_default.py ARTIFACT [--rounds 7] [--prompt-len 128] [--decode 64]

Each configuration is a fresh `kiln run` process (TVM sizes its thread pool once per process),
greedy with --ignore-eos on the same seeded prompt; the configurations take turns in every
round and the table shows medians of prefill and decode tok/s. `--threads 1` is what TVM's own
default gives on an x86 host without SMT (hardware threads / 2), which `kiln run` used before it
sized the pool itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

from kiln.runtime.threads import usable_cores


def run_once(artifact: str, ids: list[int], decode: int, threads: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")}
    cmd = [sys.executable, "-m", "kiln.compiler.cli", "run", artifact, "--prompt-ids",
           ",".join(map(str, ids)), "--max-new-tokens", str(decode), "--ignore-eos", "--json"]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    args = ap.parse_args()
    cores = usable_cores()
    configs = {"default": None, f"--threads {cores}": cores, "--threads 1": 1}
    ids = np.random.default_rng(0).integers(100, 40000, args.prompt_len).tolist()
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            runs[name].append(run_once(args.artifact, ids, args.decode, configs[name]))
    base = statistics.median(x["decode_tok_s"] for x in runs[f"--threads {cores}"])
    print(f"{args.artifact}: {cores} usable cores, prompt {args.prompt_len}, decode "
          f"{args.decode}, median of {args.rounds} alternated rounds")
    print(f"{'config':14s} {'threads':>7s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
          f"{'decode vs all-core':>19s} {'paired':>7s}  decode runs")
    for name, rs in runs.items():
        dec = statistics.median(x["decode_tok_s"] for x in rs)
        pre = statistics.median(x["prefill_tok_s"] for x in rs)
        # the median of each round's ratio: the two runs of a round share the machine's load
        paired = statistics.median(x["decode_tok_s"] / y["decode_tok_s"]
                                   for x, y in zip(rs, runs[f"--threads {cores}"], strict=True))
        print(f"{name:14s} {rs[0]['threads']:7d} {pre:14.1f} {dec:13.1f} {dec / base:18.2f}x "
              f"{paired:6.2f}x  " + " ".join(f"{x['decode_tok_s']:.1f}" for x in rs))


if __name__ == "__main__":
    main()
