"""Import TVM's runtime without its compiler library (libtvm_compiler.so may be absent)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kiln.compiler.errors import KilnError


def import_tvm(threads: int | None = None):
    """The tvm package in runtime-only mode; `threads` sizes its thread pool (set before the
    first import of tvm in this process, else ignored)."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    if threads:
        os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    try:
        import tvm
        import tvm.runtime.vm
    except (ImportError, OSError) as e:
        raise KilnError(f"cannot load the TVM runtime: {e}") from e
    return tvm


def load_cuda_runtime(tvm) -> None:
    """Register the CUDA module loader (libtvm_runtime_cuda.so) before loading CUDA kernels."""
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise KilnError(f"cannot load TVM's CUDA runtime {lib}: {e}") from e
