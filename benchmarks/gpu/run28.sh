#!/bin/bash
# Run 28 (session 10): what the last device minutes allow: batched decode throughput alone
# (run27.sh's first step). carry: .device/r23
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 55 python3 benchmarks/gpu/cuda_llm.py batchbench .device/r23 llama-3.2-1b-float16 \
  --batches 1,8,16 --decode 32 --repeat 2 --decode-after 16 > "$OUT/batchbench.log" 2>&1
echo "rc $?"; tail -12 "$OUT/batchbench.log"
