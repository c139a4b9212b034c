#!/bin/bash
# Run 47 (session 16; build: prepare_session16.sh, tuning half): re-tune the 1B decode attention
# with probes (each candidate checked and timed at 128/16/362 and 1024/363/4096 cached tokens)
# into run 42's file less its decode attention (issue 12: tuned decode >= untuned), and the
# 2:4 1B's sparse decode GEMVs (o/down, gate/up+SwiGLU, q/k/v+rotary: spaces new this session;
# issue 11's 2:4 decode >= 1.3x). carry: .device/tb2 .device/tb3
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
cp .device/tb2/seed.json "$OUT/tuning_attn.json"
start=$(date +%s)
timeout 240 python3 .device/tb2/kiln_run.py tune -o "$OUT/tuning_attn.json" --budget-s 200 \
  2> "$OUT/tune_attn.log"
echo "attn rc $? wall $(( $(date +%s) - start )) s"; tail -4 "$OUT/tune_attn.log"
start=$(date +%s)
timeout 240 python3 .device/tb3/kiln_run.py tune -o "$OUT/tuning_sp24.json" --budget-s 200 \
  2> "$OUT/tune_sp24.log"
echo "sp24 rc $? wall $(( $(date +%s) - start )) s"; tail -6 "$OUT/tune_sp24.log"
# the 1B w8's quantized decode GEMVs, every config (issue 13: w8 decode >= 1.6x fp16), when
# carried (.device/tb4: the three bundles exceed a call's 64 MiB together)
[ -d .device/tb4 ] || exit 0
start=$(date +%s)
timeout 240 python3 .device/tb4/kiln_run.py tune -o "$OUT/tuning_w8.json" --budget-s 200 \
  2> "$OUT/tune_w8.log"
echo "w8 rc $? wall $(( $(date +%s) - start )) s"; tail -7 "$OUT/tune_w8.log"
