"""Every CUDA kernel of kiln.codegen.cuda.kernels run on the GPU on seeded random inputs and
compared with the numpy specification computed from those inputs here (skipped without a GPU).

The kernels come from KILN_CUDA_KERNELS, a folder `python -m tests.codegen.cuda_kernel_cases DIR`
wrote on a build machine (kernels.so and the case names, no data), so that a GPU host with the
runtime-only TVM runs them; without it they are built here, which needs TVM's compiler and
nvcc. Inputs and expected outputs are always made at test time (tests/codegen/cuda_kernel_cases).
Tolerance: max |kernel - spec| / max |spec| <= 2e-3 for fp16 outputs, 2e-5 for fp32 (tighter
where a case says; 0 for integer and copied outputs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from tests.codegen.cuda_kernel_cases import TOL, build, cases, seed_of
from tests.conftest import has_gpu
from tests.helpers import needs_cuda_toolchain

CASES = cases()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    """(tvm, the loaded kernels module, the case names it holds)."""
    folder = os.environ.get("KILN_CUDA_KERNELS")
    if folder:
        from kiln.runtime.tvm_runtime import import_tvm

        tvm = import_tvm()
        folder = Path(folder)
    else:
        pytest.importorskip("tvm.relax", reason="building the kernels needs TVM's compiler")
        import tvm

        folder = build(tmp_path_factory.mktemp("cuda_kernels"))
    from kiln.runtime.tvm_runtime import load_cuda_runtime

    load_cuda_runtime(tvm)
    names = set(json.loads((folder / "cases.json").read_text())["cases"])
    return tvm, tvm.runtime.load_module(str(folder / "kernels.so")), names


def test_every_kernel_module_has_cases():
    """A new kernel file under codegen/cuda/kernels needs a case here (pdl.py only tags;
    gemv_rows.py and gemv_mma.py hold gemv.py's batched branches, run by the gemv cases of
    m > 1 rows; wgmma_gemm.py, experimental and for sm_90a where these cases build for sm_90,
    is checked against numpy by benchmarks/gpu/gemm_bench.py)."""
    src = Path(__file__).parents[2] / "codegen" / "cuda" / "kernels"
    text = Path(__file__).with_name("cuda_kernel_cases.py").read_text()
    modules = {p.stem for p in src.glob("*.py")} - {"__init__", "pdl", "gemv_rows", "gemv_mma",
                                                   "wgmma_gemm"}
    covered = {m for m in modules if f"kernels.{m} import" in text or f"kernels import {m}" in
               text or f", {m}" in text}
    assert covered == modules, f"no cases for {sorted(modules - covered)}"


@pytest.mark.slow
@pytest.mark.tvm
@needs_cuda_toolchain
def test_every_case_builds_to_machine_code(tmp_path):
    """Where there is no GPU, the cases still compile (nvcc, sm_90 machine code): the GPU host
    gets kernels that build (about a minute on 2 cores)."""
    pytest.importorskip("tvm.relax", reason="building the kernels needs TVM's compiler")
    folder = build(tmp_path)  # refuses a library without a fatbin for sm_90
    assert set(json.loads((folder / "cases.json").read_text())["cases"]) == {c.name for c in
                                                                            CASES}


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_the_numpy_specification(kernels, case):
    tvm, mod, names = kernels
    assert case.name in names, f"{case.name} was not built; rebuild KILN_CUDA_KERNELS"
    dev = tvm.cuda(0)
    host = case.inputs(np.random.default_rng(seed_of(case.name)))
    args = [tvm.runtime.tensor(a, dev) if isinstance(a, np.ndarray) else a for a in host]
    mod[case.name](*args)
    dev.sync()
    for i, want in case.expect(host).items():  # from the inputs as they were before the run
        got = args[i].numpy()
        assert got.shape == want.shape, (case.name, i, got.shape, want.shape)
        tol = case.tol if case.tol is not None else TOL[str(got.dtype)]
        if tol == 0:
            np.testing.assert_array_equal(got, want, err_msg=f"{case.name} output {i}")
            print(f"{case.name} output {i}: bit-exact ({got.size} values)")
            continue
        g, w = got.astype(np.float64), np.asarray(want, np.float64)
        err = np.abs(g - w)
        worst = np.unravel_index(int(err.argmax()), err.shape)
        rel = err.max() / max(np.abs(w).max(), 1e-30)
        print(f"{case.name} output {i}: max|kernel - spec| / max|spec| = {rel:.2e} "
              f"(tolerance {tol:g})")  # shown by pytest -rP: the run's record
        assert rel <= tol, (f"{case.name} output {i}: max|kernel - spec| / max|spec| = {rel:.3g} "
                            f"> {tol:g}; worst at {worst}: {g[worst]} vs {w[worst]}")


@pytest.mark.tvm
def test_the_cases_size_the_decode_scratch_as_the_kernel_does():
    pytest.importorskip("tvm.relax", reason="the kernel module needs TVM's compiler")
    from kiln.codegen.cuda.kernels import attention
    from tests.codegen import cuda_kernel_cases

    assert cuda_kernel_cases.MAX_SPLITS == attention.MAX_SPLITS
