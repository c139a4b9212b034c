#!/bin/bash
# Session 16's builds (GPU-less host, 2 cores).
# tuning half (before run 47, ~2 minutes):
#   .device/tb2   the 1B decode attention's tuning bundle (sm_90a; probes at both ends of each
#                 decode entry's span) + seed.json: run 42's file less its decode attention
#   .device/tb3   the 2:4 1B's sparse decode GEMVs (sm_90; spaces new this session)
#   .device/tb4   the 1B w8's quantized decode GEMVs, every config (sm_90)
#   .device/e2e   the 1B fp16 sm_90a default (wgmma) and `tuned` from run 42's file less its
#                 decode attention (seed.json; that attention at its default)
# artifact half (`prepare_session16.sh artifacts OUT47`, after run 47, ~2 minutes): the tuned
#   1B fp16 (.device/e2e, with run 47's decode attention) and the tuned 2:4 1B (.device/s)
set -eu
cd "$(dirname "$0")/../.."
if [ "${1:-}" = artifacts ]; then
  cp "$2/tuning_attn.json" .device/e2e/tuning.json
  rm -rf .device/e2e/arts/llama-3.2-1b-float16-tuned
  python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16::tuned
  cp "$2/tuning_sp24.json" .device/s/tuning.json
  python benchmarks/gpu/cuda_llm.py build .device/s llama-3.2-1b:float16::sp24+tuned
  du -sh .device/e2e .device/s
  exit 0
fi
rm -rf .device/tb2 .device/tb3 .device/tb4
M=.device/s/models/llama-3.2-1b/model.onnx  # the synthetic 1B (no weights)
[ -f $M ] || python benchmarks/gpu/cuda_llm.py build .device/s llama-3.2-1b:float16 llama-3.2-1b:float16::sp24
kiln tune $M --target cuda:sm_90a --max-seq 4096 --rows 2048 --only cuda.decode_attention \
  --bundle .device/tb2
python - <<'PY'
import json
d = json.load(open("benchmarks/gpu/logs/run42_tuning2048.json"))
d["entries"].pop("cuda.decode_attention")
json.dump(d, open(".device/tb2/seed.json", "w"), indent=1)
PY
kiln tune $M --target cuda:sm_90 --max-seq 4096 --rows 2048 --sparsity 2:4 \
  --only cuda.sparse_gemv,cuda.sparse_gemv_swiglu,cuda.sparse_gemv_qkv_rope --bundle .device/tb3
kiln tune $M --target cuda:sm_90 --max-seq 4096 --rows 2048 --quant w8 \
  --only cuda.quant_gemv,cuda.quant_gemv_swiglu --max-candidates 32 --bundle .device/tb4
rm -rf .device/e2e && mkdir -p .device/e2e
cp .device/tb2/seed.json .device/e2e/tuning.json
python benchmarks/gpu/cuda_llm.py build .device/e2e llama-3.2-1b:float16::wgmma \
  llama-3.2-1b:float16::tuned
du -sh .device/tb2 .device/tb3 .device/tb4 .device/e2e
