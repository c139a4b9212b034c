#!/bin/bash
# .device/h3: the runtime-only TVM (with CUDA) and the tvm-ffi wheel for Python 3.12 that the
# kernel cases run with on the GPU host (benchmarks/gpu/kernel_cases.sh; recipe in
# benchmarks/gpu/kernel_tests_log.md).
set -eu
cd "$(dirname "$0")/../.."
rm -rf .device/h3
python -c "from pathlib import Path; import shutil, typing_extensions; \
from kiln.compiler import package as pk; d = Path('.device/h3'); \
pk._copy_tvm(d / 'lib' / 'tvm', cuda=True); \
shutil.copyfile(typing_extensions.__file__, d / 'lib' / 'typing_extensions.py'); \
w = pk.find_ffi_wheel('3.12'); (d / 'wheels').mkdir(exist_ok=True); \
shutil.copyfile(w, d / 'wheels' / w.name)"
