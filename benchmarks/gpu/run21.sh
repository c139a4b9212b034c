#!/bin/bash
# Run 21 (session 9): split-KV decode attention (kernel cases + decode after 16 / 2048 cached
# tokens, split vs nosplit), tuned vs untuned with per-row-bucket prefill entries, and the
# GPU token check of the unfused artifacts. Artifacts built on the CPU host:
#   python benchmarks/gpu/cuda_llm.py build .device/b llama-3.2-1b:float16 \
#     llama-3.2-1b:float16::nosplit llama-3.2-1b:float16::tuned llama-3.2-1b:float16::nofuse \
#     smollm2-135m:float16 smollm2-135m:float16::nofuse     (tuning.json: run 20's database)
#   python -m tests.codegen.cuda_kernel_cases .device/h3/kernels   (+ the runtime-only TVM in
#     .device/h3, recipe in benchmarks/gpu/kernel_tests_log.md)
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bash benchmarks/gpu/kernel_cases.sh 45 15 | tee "$OUT/kernels.log"
timeout 120 python3 benchmarks/gpu/cuda_llm.py bench .device/b --no-hf --rounds 2 --lens 512,2048 \
  --decode 64 --decode-after 16,2048 --repeat 3 --only 'llama-3.2-1b-float16($|-nosplit|-tuned)' \
  > "$OUT/bench.log" 2>&1
grep -E "^llama|round|/" "$OUT/bench.log" | tail -40
timeout 80 python3 benchmarks/gpu/cuda_llm.py check .device/b --only 'nofuse' > "$OUT/check.log" 2>&1
grep -E "^==|greedy|top-1|FAIL" "$OUT/check.log" | head -40
