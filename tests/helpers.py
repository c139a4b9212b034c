"""Test helpers shared by every test module."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

#: CUDA builds cross-compile with nvcc (and gcc for the host side); no GPU needed
needs_cuda_toolchain = pytest.mark.skipif(
    not (shutil.which("nvcc") and shutil.which("gcc")), reason="needs nvcc and gcc")


def _host_has(flag: str) -> bool:
    from kiln.codegen.targets import _cpu_flags

    return flag in _cpu_flags()


#: the CPU sparse kernels expand packed values with AVX-512, or with AVX2 + BMI2
#: (kiln.codegen.kernels.sparse_linear); without AVX2 kiln compiles pruned weights dense
#: (tests/compiler/test_sparsity.py checks that)
needs_avx512 = pytest.mark.skipif(not _host_has("avx512f"),
                                  reason="runs AVX-512 kernels; this CPU has no avx512f")
needs_avx2 = pytest.mark.skipif(not (_host_has("avx2") and _host_has("bmi2")),
                                reason="runs AVX2 + BMI2 kernels; this CPU lacks one")

#: (rtol, atol) per dtype; fp32 relative error <= 1e-4 is the project's contract with onnxruntime
TOLERANCES = {
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(np.float16): (1e-2, 1e-3),
    np.dtype(np.float64): (1e-9, 1e-12),
}


def error_lines(stderr: str) -> list[str]:
    """The lines of a command's stderr other than its progress lines (which a command prints on
    a non-terminal before any error: kiln.compiler.progress); nothing else may be there."""
    from kiln.compiler.progress import PLAIN_LINE

    lines = stderr.strip().splitlines()
    return [line for line in lines if not PLAIN_LINE.match(line)]


def assert_close(actual, expected, *, rtol=None, atol=None, name="value"):
    """Assert allclose; on failure report max abs/rel error, the worst index and a few pairs."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    if not np.issubdtype(expected.dtype, np.floating):
        mismatch = np.argwhere(actual != expected)
        assert mismatch.size == 0, f"{name}: {len(mismatch)} mismatches, first at " \
            f"{tuple(mismatch[0])}: {actual[tuple(mismatch[0])]} != {expected[tuple(mismatch[0])]}"
        return
    dr, da = TOLERANCES.get(expected.dtype, (1e-4, 1e-5))
    rtol, atol = rtol if rtol is not None else dr, atol if atol is not None else da
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    err = np.abs(a64 - e64)
    bad = err > atol + rtol * np.abs(e64)
    if bad.any():
        worst = np.unravel_index(np.argmax(err - rtol * np.abs(e64)), err.shape)
        idx = np.argwhere(bad)[:4]
        pairs = ", ".join(f"{tuple(i)}: {a64[tuple(i)]:.6g} vs {e64[tuple(i)]:.6g}" for i in idx)
        rel = err / np.maximum(np.abs(e64), 1e-30)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.size} elements off (rtol={rtol}, atol={atol}); "
            f"max abs err {err.max():.3g}, max rel err {rel.max():.3g}, worst at {worst}; {pairs}")
