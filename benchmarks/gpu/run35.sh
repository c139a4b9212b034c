#!/bin/bash
# Run 35 (session 13 plan), right after run 34 on the warm machine: the tuning bundle at 512
# rows. carry: .device/tb512. Then compile the tuned artifact here (run36.sh's header) and
# call run36.sh within 30 s, or on a fresh machine.
set -u
OUT=${OUT:-/tmp/out}
start=$(date +%s)
timeout 330 python3 .device/tb512/kiln_run.py tune -o "$OUT/tuning512.json" --budget-s 260 \
  2> "$OUT/tune512.log"
echo "tune rc $? wall $(( $(date +%s) - start )) s"; tail -16 "$OUT/tune512.log"
