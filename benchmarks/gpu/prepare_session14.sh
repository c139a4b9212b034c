#!/bin/bash
# Builds, on the GPU-less host, what runs 40-42 carry (about 8 minutes on 2 cores):
#   .device/e2e   1B fp16 artifacts (no weights): untuned (sm_90), wgmma untuned and bf16 wgmma
#                 (sm_90a), and `tuned`, compiled from run 34's tuning file (sm_90a)
#   .device/q     1B quantized artifacts: w4g128s-pure (SwiGLU fused into the quantized gate/up
#                 GEMV), the same with float32 unpacking (qf32), w4g32, w8, kv8 and
#                 w4g128s-pure-kv8, beside fp16; + every kernel case (.device/q/kernels)
#   .device/tb    the 1B tuning bundle for sm_90a at 2048 rows (run 42: all of it in one go)
#   .device/h3    the runtime-only TVM of the kernel cases
#   .device/zoo   every zoo architecture for CUDA (run37.sh)
set -eu
cd "$(dirname "$0")/../.."
rm -rf .device/e2e .device/q .device/tb .device/h3 .device/zoo
mkdir -p .device/e2e
cp benchmarks/gpu/logs/run34_tuning2048.json .device/e2e/tuning.json
python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16 \
  llama-3.2-1b:float16::wgmma llama-3.2-1b:bfloat16::wgmma llama-3.2-1b:float16::tuned
python benchmarks/gpu/cuda_llm.py build .device/q llama-3.2-1b:float16 \
  llama-3.2-1b:float16:w4g128s-pure llama-3.2-1b:float16:w4g128s-pure:qf32 \
  llama-3.2-1b:float16:w4g32 llama-3.2-1b:float16:w8 llama-3.2-1b:float16:kv8 \
  llama-3.2-1b:float16:w4g128s-pure-kv8
python -m tests.codegen.cuda_kernel_cases .device/q/kernels
python benchmarks/gpu/qgemv_bench.py build .device/qgemv
M=.device/e2e/models/llama-3.2-1b/model.onnx
kiln tune $M --target cuda:sm_90a --max-seq 4096 --rows 2048 --bundle .device/tb
bash benchmarks/gpu/build_h3.sh
python -m kiln.models.zoo /tmp/kiln-zoo > /tmp/kiln-zoo.log 2>&1
python benchmarks/gpu/zoo_cuda.py build .device/zoo --zoo /tmp/kiln-zoo
du -sh .device/e2e .device/q .device/qgemv .device/tb .device/h3 .device/zoo
