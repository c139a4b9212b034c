#!/bin/bash
# Run 34 (plan for session 13; build: benchmarks/gpu/prepare_session13.sh): the GEMMs alone
# (wgmma fp16, bf16 and the staged epilogue beside dlight and the WMMA tiles), then the 1B
# tuning bundle at 2048 rows (sm_90a: wgmma, staged and WMMA candidates; the defaults now
# tensorized, so the bundle's default times are dlight's real ones). carry: .device/gemm .device/tb
# Then at once (the machine stays warm 30 s): run35.sh.
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
timeout 150 python3 benchmarks/gpu/gemm_bench.py run .device/gemm --bundle .device/tb \
  --repeat 10 > "$OUT/gemm.log" 2>&1
echo "gemm rc $?"; sed -n '/^shape/,$p' "$OUT/gemm.log"; grep -c BAD "$OUT/gemm.log"
start=$(date +%s)
timeout 330 python3 .device/tb/kiln_run.py tune -o "$OUT/tuning2048.json" --budget-s 260 \
  2> "$OUT/tune2048.log"
echo "tune rc $? wall $(( $(date +%s) - start )) s"; tail -16 "$OUT/tune2048.log"
