#!/bin/bash
# Run 24 (session 10): issue 12's tuning bundle on the GPU host, timed whole: the session-9 bundle
# (.device/tb: `kiln tune <1B shape> --target cuda:sm_90 --max-seq 4096 --bundle .device/tb`, 23
# kernel instances, all 51 tiles of each GEMM at 512 and 2048 rows) with session 10's
# runtime/tune.py copied into its lib/ (candidates' outputs blanked from device copies, their
# error computed in float32 chunks). Usage: bash benchmarks/gpu/run24_tune.sh [BUDGET_S]
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${1:-540}
nvidia-smi --query-gpu=name --format=csv,noheader
start=$(date +%s)
timeout $((BUDGET + 50)) python3 .device/tb/kiln_run.py tune -o "$OUT/tuning.json" \
  --budget-s "$BUDGET" 2> "$OUT/tune.log"
echo "rc $? wall $(( $(date +%s) - start )) s"
tail -26 "$OUT/tune.log"
