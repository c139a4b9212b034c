#!/bin/bash
# Run 32 (session 12), right after run 31 on the same warm machine: the 1B shape fp16, untuned
# (dlight's GEMMs, sm_90) against tuned (compiled here with run 31's tuning.json, sm_90a),
# prefill 2048 and decode, three rounds alternated; the tuned artifact against torch float64.
# carry: .device/tb .device/e2e (arts/llama-3.2-1b-float16{,-tuned})
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
ln -sfn ../tb .device/e2e/bundle
timeout 150 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 3 --lens 2048 \
  --decode 64 --repeat 3 --no-hf --only '^llama-3.2-1b-float16(-tuned)?$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|round" "$OUT/bench.log" | tail -20
timeout 100 python3 benchmarks/gpu/cuda_llm.py check .device/e2e --only 'tuned' \
  > "$OUT/check.log" 2>&1
grep -E "^==|greedy|FAIL|Error|rel err" "$OUT/check.log" | head -14
