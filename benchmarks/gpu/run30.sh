#!/bin/bash
# Run 30 (session 12): everything built since run 22 that never ran on a GPU, in one call.
# (1) gemm_bench: the experimental wgmma GEMM and the bf16 WMMA GEMM alone (numpy check, then
# TFLOP/s beside dlight and kiln's fp16 WMMA tiles); (2) end to end, 1B shape: fp16 (dlight
# GEMMs), fp16 `wgmma`, bf16 (kiln's WMMA GEMM) and fp16 2:4: prefill 2048 and decode, two rounds
# alternated, HF eager beside them; (3) those artifacts and SmolLM2 fp16 against torch float64
# (check) and batches of unequal prompts against it (checkbatch); (4) batched decode
# throughput at batch 1/4/8/16 (tensor-core and CUDA-core batched GEMVs); (5) the kernel cases.
# Built here (about 4 minutes on 2 cores):
#   python benchmarks/gpu/cuda_llm.py build .device/r23 llama-3.2-1b:float16 \
#     llama-3.2-1b:float16::nomma smollm2-135m:float16 llama-3.2-1b:float16::wgmma \
#     llama-3.2-1b:bfloat16 llama-3.2-1b:float16::sp24
#   python -m tests.codegen.cuda_kernel_cases .device/r23/kernels
#   python benchmarks/gpu/gemm_bench.py build .device/gemm
#   (.device/h3: the runtime-only TVM, recipe in benchmarks/gpu/kernel_tests_log.md)
# carry: .device/h3 .device/r23 .device/gemm
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 benchmarks/gpu/gemm_bench.py run .device/gemm --bundle .device/r23/bundle \
  --repeat 10 > "$OUT/gemm.log" 2>&1
echo "gemm rc $?"; grep -vE "^\s*$" "$OUT/gemm.log" | tail -45
cp .device/gemm/results.json "$OUT/gemm_results.json" 2>/dev/null
timeout 170 python3 benchmarks/gpu/cuda_llm.py bench .device/r23 --rounds 2 --lens 2048 \
  --decode 64 --repeat 3 --only '^llama-3.2-1b-(float16|float16-wgmma|bfloat16|float16-sp24)$' \
  > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "\||round|x$|Error" "$OUT/bench.log" | tail -30
timeout 120 python3 benchmarks/gpu/cuda_llm.py checkbatch .device/r23 \
  --only '^(llama-3.2-1b|smollm2-135m)-float16$' > "$OUT/checkbatch.log" 2>&1 &
timeout 120 python3 benchmarks/gpu/cuda_llm.py check .device/r23 \
  --only 'float16$|wgmma|bfloat16|sp24' > "$OUT/check.log" 2>&1 &
wait
grep -E "^==|batch [0-9]+ \(|FAIL|Error" "$OUT/checkbatch.log" | head -16
grep -E "^==|greedy|FAIL|Error|rel" "$OUT/check.log" | head -30
timeout 70 python3 benchmarks/gpu/cuda_llm.py batchbench .device/r23 llama-3.2-1b-float16 \
  llama-3.2-1b-float16-nomma --batches 1,4,8,16 --decode 64 --repeat 3 --decode-after 16 \
  > "$OUT/batchbench.log" 2>&1
echo "batchbench rc $?"; grep -E "batch|Error" "$OUT/batchbench.log" | tail -12
KERNELS=$PWD/.device/r23/kernels bash benchmarks/gpu/kernel_cases.sh 60 12 | tee "$OUT/kernels.log"
