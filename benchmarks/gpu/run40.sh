#!/bin/bash
# Run 40 (session 14 plan; build: benchmarks/gpu/prepare_session14.sh). (1) Every kernel case
# against numpy (new since run 38: the quantized gate/up GEMV + SwiGLU, the kv8 append and
# attention kernels); (2) issue 12: tuned against untuned 1B fp16, and wgmma as the untuned
# sm_90a default, fp16 and bf16: prefill 128 and 2048, decode after 16 and 2048 cached tokens,
# two rounds alternated, HF eager beside them; (3) the tuned artifact against torch float64.
# carry: .device/h3 .device/e2e .device/q/kernels (kernels only: see the carry list of the call)
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
KERNELS=$PWD/.device/q/kernels bash benchmarks/gpu/kernel_cases.sh 60 12 > "$OUT/kernels.log" 2>&1
tail -8 "$OUT/kernels.log"
timeout 330 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 \
  --only '^llama-3.2-1b-(float16|float16-tuned|float16-wgmma|bfloat16-wgmma)$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|HF eager|\|" "$OUT/bench.log" | tail -40
timeout 150 python3 benchmarks/gpu/cuda_llm.py check .device/e2e --only tuned > "$OUT/check.log" 2>&1
grep -E "^==|greedy|rel err" "$OUT/check.log" | head -20
