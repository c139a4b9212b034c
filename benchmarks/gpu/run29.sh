#!/bin/bash
# Run 29 (session 11): run26's GEMM bench (the experimental wgmma GEMM and the bf16 WMMA
# GEMM vs numpy, then TFLOP/s beside dlight and kiln's fp16 WMMA tiles), then run27's batched
# decode throughput and the CUDA kernel cases (run27.sh then checks the artifacts against torch).
# carry: .device/h3 .device/r23 .device/gemm
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 200 python3 benchmarks/gpu/gemm_bench.py run .device/gemm --bundle .device/r23/bundle \
  --repeat 10 > "$OUT/gemm.log" 2>&1
echo "gemm rc $?"; grep -E "BAD|^shape|TFLOP|x$" "$OUT/gemm.log" | tail -30
cp .device/gemm/results.json "$OUT/gemm_results.json" 2>/dev/null
timeout 70 python3 benchmarks/gpu/cuda_llm.py batchbench .device/r23 llama-3.2-1b-float16 \
  llama-3.2-1b-float16-nomma --batches 1,4,8,16 --decode 64 --repeat 3 --decode-after 16 \
  > "$OUT/batchbench.log" 2>&1
echo "batchbench rc $?"; grep -E "batch|Error" "$OUT/batchbench.log" | tail -12
KERNELS=$PWD/.device/r23/kernels bash benchmarks/gpu/kernel_cases.sh 60 12 | tee "$OUT/kernels.log"
