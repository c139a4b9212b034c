#!/bin/bash
# Run 46 (session 15; build: prepare_session15.sh): fp16 kv8 against torch float64 again, now
# with torch's top-1 margin printed where the greedy tokens part (is run 44's 0/32 a near-tie?);
# the 1B 2:4 artifact against torch on the densified weights; then, two rounds alternated, the 1B shape at 2:4 (`sp24`) against its dense twin (issue 11:
# decode >= 1.3x, prefill 2048 >= 1.0x; last measured in session 5) and the SmolLM2-135M shape's
# fp16 decode against its copy roofline (issue 13: >= 30%). carry: .device/q .device/s
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 benchmarks/gpu/cuda_llm.py check .device/q --only 'kv8' > "$OUT/check.log" 2>&1
echo "check rc $?"; grep -E "^==|greedy|margin|gap|rel err|Error" "$OUT/check.log" | head -40
timeout 100 python3 benchmarks/gpu/cuda_llm.py check .device/s --only 'sp24' > "$OUT/scheck.log" 2>&1
echo "scheck rc $?"; grep -E "^==|greedy|margin|gap|rel err|Error" "$OUT/scheck.log" | head -20
timeout 300 python3 benchmarks/gpu/cuda_llm.py bench .device/s --rounds 2 --lens 128,2048 \
  --decode 128 --repeat 3 --decode-after 16 --no-hf > "$OUT/sbench.log" 2>&1
echo "sbench rc $?"; grep -E "^==|prefill|decode|roofline|GB/s|dense" "$OUT/sbench.log" | tail -40
