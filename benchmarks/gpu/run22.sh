#!/bin/bash
# Run 22 (session 10), the third of three calls to one warm machine (the first two carried the
# GGUF's parts, .device/real/gguf/part{0,1}): the real SmolLM2-135M on the GPU (weights exported
# there from the GGUF, float32 and float16 artifacts vs the CPU artifact's greedy tokens), then
# the 1B shape's decode after 16 and 2048 cached tokens, split-KV (default) and `nosplit`.
# Built here by `python benchmarks/gpu/real_smollm2.py prepare .device/real` (+ the 1B artifacts
# of `cuda_llm.py build` copied into .device/real/arts).
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
ls -la .device/real/gguf
python3 benchmarks/gpu/real_smollm2.py gpu .device/real > "$OUT/real.log" 2>&1
tail -25 "$OUT/real.log"
cp .device/real/gpu_result.json "$OUT/" 2>/dev/null
timeout 150 python3 benchmarks/gpu/cuda_llm.py bench .device/real --no-hf --rounds 2 --lens 2048 \
  --decode 64 --decode-after 16,2048 --repeat 3 --only 'llama-3.2-1b-float16($|-nosplit)' \
  > "$OUT/bench.log" 2>&1
grep -E "^llama|decode|prefill|round" "$OUT/bench.log" | tail -24
