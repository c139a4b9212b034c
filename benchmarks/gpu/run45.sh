#!/bin/bash
# Run 45 (session 15 plan; build: benchmarks/gpu/prepare_session15.sh): issue 12's "tuned decode
# >= untuned" with run 42's complete tuning file, three rounds alternated (decode after 16 and
# 2048 cached tokens, prefill 128 and 2048): tuned against the sm_90a default (wgmma) and
# against sm_90a without it (dlight); then w8 and kv8 decode beside fp16. carry: .device/e2e .device/q
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 380 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 3 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|HF eager" "$OUT/bench.log" | tail -45
timeout 200 python3 benchmarks/gpu/cuda_llm.py bench .device/q --rounds 2 --lens 128 \
  --decode 64 --repeat 3 --decode-after 16,2048 --no-hf > "$OUT/qbench.log" 2>&1
echo "qbench rc $?"; grep -E "^==|decode" "$OUT/qbench.log" | tail -20
