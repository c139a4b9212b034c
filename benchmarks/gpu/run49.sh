#!/bin/bash
# Run 49 (session 16; build: prepare_session16.sh artifacts): issue 11's 2:4 1B against its
# dense twin, untuned and with run 47's sparse GEMV schedules (decode >= 1.3x, prefill 2048 >=
# 1.0x), two rounds alternated; then the 2:4 artifacts against torch on the densified weights
# (run 46's check timed out at 100 s). carry: .device/s
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 260 python3 benchmarks/gpu/cuda_llm.py bench .device/s --rounds 2 --lens 2048 \
  --decode 128 --repeat 3 --decode-after 16 --no-hf --only llama > "$OUT/sbench.log" 2>&1
echo "sbench rc $?"; grep -E "^==|prefill|decode|roofline" "$OUT/sbench.log" | tail -30
timeout 300 python3 benchmarks/gpu/cuda_llm.py check .device/s --only 'sp24' > "$OUT/scheck.log" 2>&1
echo "scheck rc $?"; grep -E "^==|greedy|margin|gap|rel err|Error|PASS|FAIL" "$OUT/scheck.log" | head -30
