#!/bin/bash
# Run 36 (session 13 plan): tuned against untuned (and wgmma as the sm_90a default, untuned),
# 1B fp16, prompts of 128, 512 and 2048 and
# decode, three rounds alternated, HF eager beside them; the tuned artifact and bf16 against
# torch float64; batches of unequal prompts with torch's margins where a row parts.
# Before it, here: merge runs 34-35's files and compile the tuned artifact:
#   python -c "import json,sys; a,b=(json.load(open(f)) for f in sys.argv[1:3]); \
#     [a['entries'].setdefault(k,{}).update(v) for k,v in b['entries'].items()]; \
#     json.dump(a,open('.device/e2e/tuning.json','w'))" T2048.json T512.json
#   python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16::tuned
# carry: .device/e2e
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv,noheader
timeout 360 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 3 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 --only '^llama-3.2-1b-(float16|float16-tuned|float16-wgmma|bfloat16-wgmma)$' > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|HF eager|\|" "$OUT/bench.log" | tail -40
timeout 110 python3 benchmarks/gpu/cuda_llm.py check .device/e2e --only tuned \
  > "$OUT/check.log" 2>&1
grep -E "^==|greedy|rel err" "$OUT/check.log" | head -24
