#!/bin/bash
# Run 42 (session 14 plan): issue 12's "the tuning bundle runs in <= 10 minutes of device time":
# the whole 1B bundle (16 instances, 79-81 candidates per prefill GEMM) in one call, budget
# 540 s (run 34 measured 8 instances in its 260 s). carry: .device/tb
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
start=$(date +%s)
timeout 580 python3 .device/tb/kiln_run.py tune -o "$OUT/tuning.json" --budget-s 540 \
  2> "$OUT/tune.log"
echo "tune rc $? wall $(( $(date +%s) - start )) s"; tail -20 "$OUT/tune.log"
