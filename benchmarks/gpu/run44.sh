#!/bin/bash
# Run 44 (session 14, what the last 320 s of device time allowed; build:
# benchmarks/gpu/prepare_session14.sh): the kv8 and fused-SwiGLU 1B artifacts against torch
# float64 (greedy 32, and 16 after 420 tokens), then one round of decode after 16 and 2048
# cached tokens of fp16, w4g128s-pure, kv8 and w8 (the call's limit cut it after w4g128s-pure).
# carry: .device/q
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 160 python3 benchmarks/gpu/cuda_llm.py check .device/q --only 'kv8|w4g128s-pure$' \
  > "$OUT/check.log" 2>&1
grep -E "^==|greedy|rel err|Error" "$OUT/check.log" | head -40
timeout 130 python3 benchmarks/gpu/cuda_llm.py bench .device/q --rounds 1 --lens 128 --decode 64 \
  --repeat 3 --decode-after 16,2048 --no-hf --only 'float16(-w4g128s-pure|-kv8|-w8)?$' \
  > "$OUT/bench.log" 2>&1
grep -E "^==|decode" "$OUT/bench.log" | tail -30
