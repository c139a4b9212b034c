#!/bin/bash
# Run 31 (session 12): issue 12's tuning bundle for the 1B shape on sm_90a (the cuda.gemm space with its wgmma configs: 15 instances, 66
# candidates per prefill GEMM), timed whole under a budget.
# Built here:
#   kiln tune .device/r23/models/llama-3.2-1b/model.onnx --target cuda:sm_90a --max-seq 4096 \
#     --rows 2048 --bundle .device/tb                  (2.5 minutes on 2 cores, 44 MB)
# carry: .device/tb (run 32 follows on the same warm machine: its tuned artifact is compiled
# here from this run's tuning.json the moment it is back)
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${1:-330}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
start=$(date +%s)
timeout $((BUDGET + 90)) python3 .device/tb/kiln_run.py tune -o "$OUT/tuning.json" \
  --budget-s "$BUDGET" 2> "$OUT/tune.log"
echo "tune rc $? wall $(( $(date +%s) - start )) s"
tail -20 "$OUT/tune.log"
