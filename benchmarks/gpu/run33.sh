#!/bin/bash
# Run 33 (session 12): the tuned 1B artifact rebuilt after dlight's sm_90a fix (its 512-row
# bucket had run dlight's GEMMs on the CUDA cores: run 32's prefill 128 at 0.27x), against the
# untuned one: prefill 128 and 2048, decode, two rounds alternated.
# carry: .device/e2e (arts/llama-3.2-1b-float16{,-tuned}, models/, bundle/ = run 30's bundle)
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 140 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 128,2048 \
  --decode 64 --repeat 3 --no-hf --only '^llama-3.2-1b-float16(-tuned)?$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==" "$OUT/bench.log"
