#!/bin/bash
# Run 36b (session 13): run 36 cut to the device time left (~170 s): tuned against untuned,
# 1B fp16 (sm_90a; tuning file of run 34, 2048-row instances: the five prefill GEMMs and the
# decode attention at 128 cached tokens tuned, the rest at their defaults), prefill 2048 and
# decode after 16 and 2048 cached tokens, two rounds alternated, no HF eager peer (session 12's
# H100 figure, 159.4k tok/s, is the reference). carry: .device/e2e
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 170 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 --no-hf \
  --only '^llama-3.2-1b-(float16|float16-tuned)$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|\|" "$OUT/bench.log" | tail -30
