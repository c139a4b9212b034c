#!/bin/bash
# Run 23: batched decode (issue 13 item 4). The batched GEMV / per-row-length kernel cases vs the
# numpy spec; greedy decode tok/s summed over the rows at batch 1, 4, 8, 16 (prompts of unequal
# lengths) and the ratios to batch 1, the batched GEMVs on the tensor cores (default) and on the
# CUDA cores (`nomma`); batches of 4 and 16 unequal prompts (prefill_batch + 32 greedy steps of
# all rows at once) vs torch float64 of each prompt alone; the batch-1 check as before.
# Built here (about 9 minutes on 2 cores):
#   python benchmarks/gpu/cuda_llm.py build .device/r23 llama-3.2-1b:float16 \
#     llama-3.2-1b:float16::nomma smollm2-135m:float16
#   python -m tests.codegen.cuda_kernel_cases .device/r23/kernels
# carry: .device/h3 (the runtime-only TVM of the kernel cases) and .device/r23
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
KERNELS=$PWD/.device/r23/kernels bash benchmarks/gpu/kernel_cases.sh 60 12 | tee "$OUT/kernels.log"
timeout 70 python3 benchmarks/gpu/cuda_llm.py batchbench .device/r23 llama-3.2-1b-float16 \
  llama-3.2-1b-float16-nomma --batches 1,4,8,16 --decode 64 --repeat 3 --decode-after 16 \
  > "$OUT/batchbench.log" 2>&1
grep -E "batch|Error" "$OUT/batchbench.log" | tail -12
timeout 100 python3 benchmarks/gpu/cuda_llm.py checkbatch .device/r23 > "$OUT/checkbatch.log" 2>&1 &
timeout 100 python3 benchmarks/gpu/cuda_llm.py check .device/r23 --only 'float16$' \
  > "$OUT/check.log" 2>&1 &
wait
grep -E "^==|batch [0-9]+ \(|FAIL|Error" "$OUT/checkbatch.log" | head -20
grep -E "^==|greedy|FAIL|Error" "$OUT/check.log" | head -20
