#!/bin/bash
# Run 43 (session 14): issue 12's end-to-end comparison on the device that tuned: run 42's
# tuning file compiled in (`cuda_llm.py build .device/e2e llama-3.2-1b:float16::tuned` with
# .device/e2e/tuning.json = run 42's output), against the untuned sm_90 default (dlight), the
# untuned sm_90a default with wgmma (now the staged bn128 s3 tile) and its bf16 twin; prefill 128
# and 2048, decode after 16 and 2048 cached tokens, two rounds alternated, HF eager beside them;
# then the tuned artifact against torch float64; the kernel cases last (least needed).
# carry: .device/h3 .device/e2e .device/q/kernels
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 330 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 \
  --only '^llama-3.2-1b-(float16|float16-tuned|float16-wgmma|bfloat16-wgmma)$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|HF eager|\|" "$OUT/bench.log" | tail -40
timeout 120 python3 benchmarks/gpu/cuda_llm.py check .device/e2e --only 'tuned|wgmma' > "$OUT/check.log" 2>&1
grep -E "^==|greedy|rel err" "$OUT/check.log" | head -20
KERNELS=$PWD/.device/q/kernels bash benchmarks/gpu/kernel_cases.sh 100 12 > "$OUT/kernels.log" 2>&1
tail -8 "$OUT/kernels.log"
