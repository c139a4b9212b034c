"""Import TVM's runtime without its compiler library (libtvm_compiler.so may be absent)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from kiln.compiler.errors import KilnError
from kiln.runtime.threads import allowed_cpus, usable_cores


def import_tvm(threads: int | None = None):
    """The tvm package in runtime-only mode, its CPU thread pool sized by `size_thread_pool`."""
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    size_thread_pool(threads)
    try:
        import tvm
        import tvm.runtime.vm
    except (ImportError, OSError) as e:
        raise KilnError(f"cannot load the TVM runtime: {e}") from e
    return tvm


def size_thread_pool(threads: int | None = None) -> None:
    """Size TVM's CPU thread pool: `threads` when given, else TVM_NUM_THREADS when the user set
    it, else the usable cores (kiln.runtime.threads). TVM reads the size when a thread first
    runs a parallel kernel, so later calls in the same process change nothing
    (`tvm.runtime.num_threads()` says what it got)."""
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    else:
        os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
    if len(allowed_cpus()) < (os.cpu_count() or 1):
        # TVM pins its threads to CPUs 0..n-1 of the machine, outside a taskset/cpuset mask
        # (seen: `taskset -c 1` ran kernels on CPU 0); unpinned, they inherit the mask
        os.environ.setdefault("TVM_BIND_THREADS", "0")


def load_cuda_runtime(tvm) -> None:
    """Register the CUDA module loader (libtvm_runtime_cuda.so) before loading CUDA kernels."""
    lib = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    try:
        ctypes.CDLL(str(lib), ctypes.RTLD_GLOBAL)
    except OSError as e:
        raise KilnError(f"cannot load TVM's CUDA runtime {lib}: {e}") from e
