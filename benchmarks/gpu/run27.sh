#!/bin/bash
# Run 27 (session 10): run23.sh's batched-decode checks (kernel cases, batch 1/4/8/16 throughput
# of the tensor-core batched GEMVs, batches of unequal prompts vs torch float64), then the 1B
# fp16 `wgmma` and bf16 artifacts (built into .device/w, copied into .device/r23/arts) against
# torch float64 and timed (prefill 2048, decode; HF eager beside them) with the fp16 baseline.
# carry: .device/h3 .device/r23
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 60 python3 benchmarks/gpu/cuda_llm.py batchbench .device/r23 llama-3.2-1b-float16 \
  --batches 1,4,8,16 --decode 64 --repeat 3 --decode-after 16 > "$OUT/batchbench.log" 2>&1
grep -E "batch|Error" "$OUT/batchbench.log" | tail -8
KERNELS=$PWD/.device/r23/kernels bash benchmarks/gpu/kernel_cases.sh 50 12 | tee "$OUT/kernels.log"
timeout 110 python3 benchmarks/gpu/cuda_llm.py checkbatch .device/r23 --only '^(llama-3.2-1b|smollm2-135m)-float16$' \
  > "$OUT/checkbatch.log" 2>&1 &
timeout 110 python3 benchmarks/gpu/cuda_llm.py check .device/r23 \
  --only 'float16$|wgmma|bfloat16' > "$OUT/check.log" 2>&1 &
wait
grep -E "^==|batch [0-9]+ \(|FAIL|Error" "$OUT/checkbatch.log" | head -16
grep -E "^==|greedy|FAIL|Error" "$OUT/check.log" | head -24
timeout 100 python3 benchmarks/gpu/cuda_llm.py bench .device/r23 --rounds 1 --lens 2048 \
  --decode 32 --repeat 2 --only '^llama-3.2-1b-(float16|float16-wgmma|bfloat16)$' \
  > "$OUT/bench.log" 2>&1
grep -E "\|" "$OUT/bench.log" | tail -12
