#!/bin/bash
# Builds, on the GPU-less host, everything runs 34-36 carry (about 8 minutes on 2 cores):
#   .device/gemm   the prefill GEMMs alone: dlight, WMMA tiles, wgmma fp16/bf16/staged (sm_90a)
#   .device/e2e    1B-shape artifacts (no weights): fp16 (sm_90, untuned), bf16, and the bundle
#   .device/tb     the 1B tuning bundle for sm_90a at 2048 prefill rows
#   .device/tb512  the same at 512 rows (the bucket prompts of <= ~724 tokens run)
#   .device/h3     the runtime-only TVM of the kernel cases (+ .device/e2e/kernels: the cases)
#   .device/zoo    every zoo architecture for CUDA, fp16 and fp32, with a bundle (run37.sh, 59 MB)
# After run 35 returns, compile the tuned artifact from both tuning files at once (see run36.sh).
set -eu
cd "$(dirname "$0")/../.."
python benchmarks/gpu/gemm_bench.py build .device/gemm
python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16 llama-3.2-1b:bfloat16 \
  llama-3.2-1b:float16::wgmma   # (wgmma as the untuned default on sm_90a: the policy question)
python -m tests.codegen.cuda_kernel_cases .device/e2e/kernels
M=.device/e2e/models/llama-3.2-1b/model.onnx
kiln tune $M --target cuda:sm_90a --max-seq 4096 --rows 2048 --bundle .device/tb
kiln tune $M --target cuda:sm_90a --max-seq 4096 --rows 512 --bundle .device/tb512
bash benchmarks/gpu/build_h3.sh
python -m kiln.models.zoo /tmp/kiln-zoo > /tmp/kiln-zoo.log 2>&1
python benchmarks/gpu/zoo_cuda.py build .device/zoo --zoo /tmp/kiln-zoo
du -sh .device/gemm .device/e2e .device/tb .device/tb512 .device/h3 .device/zoo
