#!/bin/bash
# Run 21b (session 9): what the last 320 s of device time allow: the split-KV decode attention
# against the numpy spec (every kernel case), then decode after 16 and 2048 cached tokens, split
# (the default) and `nosplit`, one round. Built as for run21.sh.
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
bash benchmarks/gpu/kernel_cases.sh 45 8 | tee "$OUT/kernels.log"
timeout 100 python3 benchmarks/gpu/cuda_llm.py bench .device/b --no-hf --rounds 1 --lens 2048 \
  --decode 64 --decode-after 16,2048 --repeat 3 --only 'llama-3.2-1b-float16($|-nosplit)' \
  > "$OUT/bench.log" 2>&1
grep -E "^llama|decode|prefill" "$OUT/bench.log" | tail -20
