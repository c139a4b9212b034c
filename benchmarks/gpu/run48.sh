#!/bin/bash
# Run 48 (session 16; build: prepare_session16.sh artifacts): issue 12's "tuned decode >=
# untuned" again, the tuned 1B now with run 47's decode attention (measured at both ends of each
# decode entry's span) and run 42's other kernels; three rounds alternated, decode after 16 and
# 2048 cached tokens, prefill 128 and 2048, against the sm_90a default. carry: .device/e2e
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 420 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 3 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 --no-hf > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|roofline" "$OUT/bench.log" | tail -45
