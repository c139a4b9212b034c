#!/bin/bash
# Issue 15's speed points on a quiet host, all cores (2 here), engines alternated:
#   w4g32 decode vs llama.cpp Q4_1 (3 rounds of llama-bench then kiln bench),
#   w8-a8 prefill 512 vs onnxruntime fp32 (kiln bench --vs-onnx, medians of 5).
# Usage: W4G32=ART W4G32_FLOAT=ART W8A8=ART FP32=ART MODEL=model.onnx LLAMA_BENCH=llama-bench \
#        GGUF=SmolLM2-135M-Instruct.Q4_1.gguf bash benchmarks/int8_cpu_speed.sh
# (session 9's run: benchmarks/logs/issue15_speed_session9.txt; llama.cpp built per
# ../shared/notes/peers.md)
set -u
export HF_HUB_OFFLINE=1
uptime
for r in 1 2 3; do
  echo "== round $r"
  "$LLAMA_BENCH" -m "$GGUF" -t 2 -p 512 -n 64 -r 3 2>/dev/null | grep -E "pp512|tg64"
  kiln bench "$W4G32" "$W4G32_FLOAT" --label w4g32 --label w4g32-a32 --prompt-lens 512 \
    --decode-len 64 --repeat 3 --threads 2 -q 2>&1 | grep -E "│ w4g32"
done
echo "== w8-a8 vs onnxruntime"
kiln bench "$W8A8" "$FP32" --vs-onnx "$MODEL" --label w8-a8 --label fp32 \
  --label onnxruntime-fp32 --prompt-lens 512 --decode-len 64 --repeat 5 --threads 2 -q 2>&1
uptime
