#!/bin/bash
# Run 31 (session 12): (1) the 1B shape fp16 end to end, dlight's GEMMs (sm_90) against the wgmma
# GEMM (sm_90a), prefill 2048 and decode, two rounds alternated; (2) issue 12's tuning bundle
# for the 1B shape on sm_90a (the cuda.gemm space with its wgmma configs: 15 instances, 66
# candidates per prefill GEMM), timed whole under a budget.
# Built here:
#   kiln tune .device/r23/models/llama-3.2-1b/model.onnx --target cuda:sm_90a --max-seq 4096 \
#     --rows 2048 --bundle .device/tb                  (2.5 minutes on 2 cores, 44 MB)
#   .device/e2e: arts/llama-3.2-1b-float16{,-wgmma} and models/ of run 30's .device/r23
# carry: .device/tb .device/e2e (the bundle of .device/e2e is .device/tb, linked there)
set -u
OUT=${OUT:-/tmp/out}
BUDGET=${1:-330}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
ln -sfn ../tb .device/e2e/bundle
timeout 110 python3 benchmarks/gpu/cuda_llm.py bench .device/e2e --rounds 2 --lens 2048 \
  --decode 64 --repeat 3 --no-hf > "$OUT/bench.log" 2>&1
echo "bench rc $?"; grep -E "^prefill|^decode|^==|round" "$OUT/bench.log" | tail -16
start=$(date +%s)
timeout $((BUDGET + 90)) python3 .device/tb/kiln_run.py tune -o "$OUT/tuning.json" \
  --budget-s "$BUDGET" 2> "$OUT/tune.log"
echo "tune rc $? wall $(( $(date +%s) - start )) s"
tail -20 "$OUT/tune.log"
