#!/bin/bash
# Run 47 (session 16; build: prepare_session16.sh): each part runs when its folder is carried
# (three bundles and an artifact folder exceed a call's 64 MiB together).
#   .device/tb2  re-tune the 1B decode attention with probes (each candidate checked and timed at
#                128/16/362 and 1024/363/4096 cached tokens) into run 42's file less its decode
#                attention (issue 12: tuned decode >= untuned)
#   .device/tb3  the 2:4 1B's sparse decode GEMVs (o/down, gate/up+SwiGLU, q/k/v+rotary: spaces
#                new this session; issue 11's 2:4 decode >= 1.3x)
#   .device/tb4  the 1B w8's quantized decode GEMVs, every config (issue 13: w8 >= 1.6x fp16)
#   .device/e2e  tuned (run 42's file, decode attention at its default) against the sm_90a
#                default, two rounds alternated: decode after 16 and 2048, prefill 128, 2048
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
tune() {  # bundle, output name, seconds
  [ -d "$1" ] || return 0
  [ -f "$1/seed.json" ] && cp "$1/seed.json" "$OUT/tuning_$2.json"
  local start=$(date +%s)
  timeout "$3" python3 "$1/kiln_run.py" tune -o "$OUT/tuning_$2.json" --budget-s $(( $3 - 30 )) \
    2> "$OUT/tune_$2.log"
  echo "$2 rc $? wall $(( $(date +%s) - start )) s"; tail -7 "$OUT/tune_$2.log"
}
tune .device/tb2 attn 110
tune .device/tb3 sp24 200
tune .device/tb4 w8 200
[ -d .device/e2e ] || exit 0
timeout 260 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 128,2048 \
  --decode 64 --repeat 3 --decode-after 16,2048 --no-hf > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|roofline" "$OUT/bench.log" | tail -45
