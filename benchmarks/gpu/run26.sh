#!/bin/bash
# Run 26 (session 10), call 1 of the final GPU session: (1) the experimental wgmma GEMM and the
# bf16 WMMA GEMM alone (gemm_bench.py: numpy check, then TFLOP/s beside dlight and kiln's fp16
# WMMA tiles); (2) end to end, the 1B shape fp16 (dlight GEMMs), fp16 `wgmma` and bf16 (kiln's
# WMMA GEMMs, new this session): each against torch float64 (check), then prefill 2048 and
# decode (bench, HF eager beside it for the prefill figure of issue 13).
# Built here: `python benchmarks/gpu/gemm_bench.py build .device/gemm`, `python
# benchmarks/gpu/cuda_llm.py build .device/w llama-3.2-1b:float16 llama-3.2-1b:float16::wgmma
# llama-3.2-1b:bfloat16`. carry: .device/gemm .device/w
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python3 benchmarks/gpu/gemm_bench.py run .device/gemm --bundle .device/w/bundle \
  --repeat 10 > "$OUT/gemm.log" 2>&1
echo "gemm rc $?"; grep -E "BAD|^shape|TFLOP|x$" "$OUT/gemm.log" | tail -40
cp .device/gemm/results.json "$OUT/gemm_results.json" 2>/dev/null
timeout 150 python3 benchmarks/gpu/cuda_llm.py check .device/w > "$OUT/check.log" 2>&1
echo "check rc $?"; grep -E "^==|greedy|rel err|FAIL|Error" "$OUT/check.log" | grep -v "prefill1 \|last1 " | head -30
timeout 170 python3 benchmarks/gpu/cuda_llm.py bench .device/w --rounds 1 --lens 2048 \
  --decode 64 --repeat 3 > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "\|" "$OUT/bench.log" | tail -16
