#!/bin/bash
# Run 38 (session 13): quantized decode (issue 13 item 2). (1) qgemv_bench: the int4/int8
# decode GEMVs alone, codes unpacked to float32 (`f32`, before) and to half2 (`f16x2`, now the
# fp16 default), beside the fp16 GEMV, L2-hot and from HBM; (2) the kernel cases (the quant
# GEMV cases included) against numpy; (3) end to end, 1B fp16: decode of w4g128s-pure, w4g32
# and w8 with f16x2 and with f32 (`qf32`) beside fp16, three rounds alternated; (4) those
# artifacts against torch float64 (dequantized weights), greedy 32.
# Built here:
#   python benchmarks/gpu/qgemv_bench.py build .device/qgemv
#   python benchmarks/gpu/cuda_llm.py build .device/q llama-3.2-1b:float16 \
#     llama-3.2-1b:float16:w4g128s-pure llama-3.2-1b:float16:w4g128s-pure:qf32 \
#     llama-3.2-1b:float16:w4g32 llama-3.2-1b:float16:w8 llama-3.2-1b:float16:w8:qf32
#   python -m tests.codegen.cuda_kernel_cases .device/q/kernels
# carry: .device/qgemv .device/q .device/h3
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 120 python3 benchmarks/gpu/qgemv_bench.py run .device/qgemv --bundle .device/q/bundle \
  > "$OUT/qgemv.log" 2>&1
echo "qgemv rc $?"; sed -n '/^shape/,$p' "$OUT/qgemv.log"; grep -E "BAD|Error" "$OUT/qgemv.log" | head
cp .device/qgemv/results.json "$OUT/qgemv_results.json" 2>/dev/null
KERNELS=$PWD/.device/q/kernels bash benchmarks/gpu/kernel_cases.sh 60 12 > "$OUT/kernels.log" 2>&1
tail -6 "$OUT/kernels.log"
timeout 200 python3 benchmarks/gpu/cuda_llm.py bench .device/q --rounds 3 --lens 128 \
  --decode 64 --repeat 3 --no-hf > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "\||round|x$|Error" "$OUT/bench.log" | tail -30
timeout 150 python3 benchmarks/gpu/cuda_llm.py check .device/q --only 'w4|w8' \
  > "$OUT/check.log" 2>&1
grep -E "^==|greedy|FAIL|Error|rel" "$OUT/check.log" | head -30
