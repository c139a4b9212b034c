#!/bin/bash
# On the GPU host: every CUDA kernel case against the numpy spec, with the runtime-only TVM of
# .device/h3 and the kernels built there (recipe: benchmarks/gpu/kernel_tests_log.md).
# Usage: bash benchmarks/gpu/kernel_cases.sh SECONDS LINES > LOG  (a pytest time limit; the
# summary lines kept; KERNELS=DIR: kernels built elsewhere than .device/h3/kernels)
python3 -c "import zipfile,glob; zipfile.ZipFile(glob.glob('.device/h3/wheels/*.whl')[0]).extractall('/tmp/site')"
mkdir -p /tmp/k/kiln
for d in compiler passes codegen runtime models; do ln -sfn "$PWD/$d" "/tmp/k/kiln/$d"; done
ln -sfn "$PWD/api/__init__.py" /tmp/k/kiln/__init__.py
export PYTHONPATH=/tmp/site:$PWD/.device/h3/lib:/tmp/k:$PWD KILN_CUDA_KERNELS=${KERNELS:-$PWD/.device/h3/kernels}
timeout "$1" python3 -m pytest -q -p no:cacheprovider tests/codegen/test_cuda_kernels.py 2>&1 | tail -"$2"
