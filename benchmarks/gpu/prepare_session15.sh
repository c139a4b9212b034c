#!/bin/bash
# Builds, on the GPU-less host, what runs 45-46 carry (about 4 minutes on 2 cores):
#   .device/e2e   1B fp16 artifacts (no weights): sm_90a untuned (wgmma default, what `--target
#                 cuda` gives), sm_90a with the wgmma default off (`nowgmma`: dlight GEMMs),
#                 and `tuned`, compiled from run 42's complete tuning file (decode GEMVs tuned)
#   .device/q     1B fp16, w8 and kv8 for the decode figures run 44 did not reach
#   .device/h3    the runtime-only TVM of the kernel cases
set -eu
cd "$(dirname "$0")/../.."
rm -rf .device/e2e .device/q
mkdir -p .device/e2e
cp benchmarks/gpu/logs/run42_tuning2048.json .device/e2e/tuning.json
python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16::wgmma \
  llama-3.2-1b:float16::nowgmma llama-3.2-1b:float16::tuned
python benchmarks/gpu/cuda_llm.py build .device/q llama-3.2-1b:float16 llama-3.2-1b:float16:w8 \
  llama-3.2-1b:float16:kv8
[ -d .device/h3 ] || bash benchmarks/gpu/build_h3.sh
du -sh .device/e2e .device/q .device/h3
