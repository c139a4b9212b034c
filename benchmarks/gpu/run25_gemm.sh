#!/bin/bash
# Run 25 (session 10): the experimental wgmma prefill GEMM (codegen/cuda/kernels/wgmma_gemm.py)
# against kiln's WMMA tiles (fp16 and bf16) and dlight's schedule, 1B shapes at 2048 rows, each
# checked against numpy before it is timed. Built here: `python benchmarks/gpu/gemm_bench.py
# build .device/gemm`; carried with a bundle (.device/real/bundle).
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 280 python3 benchmarks/gpu/gemm_bench.py run .device/gemm --bundle .device/real/bundle \
  > "$OUT/gemm.log" 2>&1
echo "rc $?"
tail -40 "$OUT/gemm.log"
cp .device/gemm/results.json "$OUT/gemm_results.json" 2>/dev/null
