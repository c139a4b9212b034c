#!/bin/bash
# Run 41 (session 14 plan): quantized decode and kv8 (issue 13 items 2 and 3). (1) The
# quantized GEMVs alone (qgemv_bench); (2) 1B decode after 16 and 2048 cached tokens of fp16,
# w4g128s-pure (SwiGLU fused), its qf32 twin, w4g32, w8, kv8 and w4g128s-pure-kv8, two rounds
# alternated; (3) the kv8 and fused-SwiGLU artifacts against torch float64 (greedy 32 and 16
# after 420 tokens). carry: .device/q .device/qgemv
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 100 python3 benchmarks/gpu/qgemv_bench.py run .device/qgemv --bundle .device/q/bundle \
  --repeat 5 > "$OUT/qgemv.log" 2>&1
echo "qgemv rc $?"; sed -n '/^shape/,$p' "$OUT/qgemv.log"
timeout 300 python3 benchmarks/gpu/cuda_llm.py bench .device/q --rounds 2 --lens 128 \
  --decode 64 --repeat 3 --decode-after 16,2048 --no-hf > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^==|decode|\|" "$OUT/bench.log" | tail -40
timeout 170 python3 benchmarks/gpu/cuda_llm.py check .device/q --only 'kv8|w4g128s-pure$' \
  > "$OUT/check.log" 2>&1
grep -E "^==|greedy|rel err|Error" "$OUT/check.log" | head -30
