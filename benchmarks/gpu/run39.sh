#!/bin/bash
# Run 39 (session 13), cut to the device time left: (1) the kernel cases with the quantized
# GEMV + SwiGLU kernels (built by `python -m tests.codegen.cuda_kernel_cases .device/qsw/kernels`),
# (2) run 36b: tuned against untuned 1B fp16, prefill 2048 and decode after 16 and 2048, two
# rounds alternated (logs go to $OUT as they come: a cut run keeps what it measured).
# carry: .device/h3 .device/qsw .device/e2e
set -u
OUT=${OUT:-/tmp/out}
KERNELS=$PWD/.device/qsw/kernels bash benchmarks/gpu/kernel_cases.sh 40 8 > "$OUT/kernels.log" 2>&1
tail -4 "$OUT/kernels.log"
bash benchmarks/gpu/run36b.sh
