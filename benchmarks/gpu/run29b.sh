#!/bin/bash
# Run 29, call 2: batches of unequal prompts vs torch float64 (checkbatch), the fp16 / wgmma /
# bf16 1B artifacts vs torch float64 (check), then prefill 2048 + decode timed with HF eager.
# carry: .device/h3 .device/r23
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
timeout 150 python3 benchmarks/gpu/cuda_llm.py checkbatch .device/r23 --only '^(llama-3.2-1b|smollm2-135m)-float16$' \
  > "$OUT/checkbatch.log" 2>&1 &
timeout 150 python3 benchmarks/gpu/cuda_llm.py check .device/r23 \
  --only 'float16$|wgmma|bfloat16' > "$OUT/check.log" 2>&1 &
wait
grep -E "^==|batch [0-9]+ \(|FAIL|Error" "$OUT/checkbatch.log" | head -16
grep -E "^==|greedy|FAIL|Error" "$OUT/check.log" | head -24
timeout 150 python3 benchmarks/gpu/cuda_llm.py bench .device/r23 --rounds 1 --lens 2048 \
  --decode 32 --repeat 3 --only '^llama-3.2-1b-(float16|float16-wgmma|bfloat16)$' \
  > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "\|" "$OUT/bench.log" | tail -12
