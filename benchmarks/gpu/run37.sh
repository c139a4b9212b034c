#!/bin/bash
# Run 37 (session 13 plan; build: prepare_session13.sh): issue 13 item 6, every zoo architecture
# that compiles for the CPU, built for CUDA (fp16, fp32), against torch float64 of its canonical
# graph on the GPU (prefill logits at several lengths, 32 greedy steps). carry: .device/zoo
set -u
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 500 python3 benchmarks/gpu/zoo_cuda.py check .device/zoo > "$OUT/zoo.log" 2>&1
echo "zoo rc $?"; tail -50 "$OUT/zoo.log"
