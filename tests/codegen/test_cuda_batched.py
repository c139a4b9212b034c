"""Batched decode on the CUDA target, without a GPU: the decode GEMVs branch on the number of rows
(one row: the one-row kernel; more: the tensor-core kernel, or the CUDA-core row buckets), each
branch its own sm_90 kernel; the numpy specification of the per-row-length kernel cases; the
row-bucket and warp-split choices. (tests/codegen/test_cuda_kernels.py runs every case on a GPU;
tests/runtime/test_session_ragged.py the runtime's bookkeeping.)"""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")


def test_row_buckets_and_warp_splits():
    from kiln.codegen.cuda.kernels import gemv_mma as GM
    from kiln.codegen.cuda.kernels import gemv_rows as GR

    assert [GR.bucket_rows(m) for m in (2, 4, 5, 8, 9, 16, 40)] == [4, 4, 8, 8, 16, 16, 16]
    # 8 warps where each still streams 8 steps of 32 elements; none for fp32 or ragged k
    assert [GM.mma_warps(k, "float16") for k in (2048, 8192, 576, 1536, 256, 128)] == [
        8, 8, 2, 4, 1, 1]
    assert GM.mma_warps(2048, "float32") == 0 and GM.mma_warps(200, "float16") == 0


def test_ragged_cases_spec_each_row_at_its_own_length():
    from tests.codegen import cuda_kernel_cases as C

    case = next(c for c in C.cases() if c.name == "qkv_rope_gemv_ragged_f16")
    args = case.inputs(np.random.default_rng(C.seed_of(case.name)))
    want = case.expect(args)
    lens = args[7]
    assert lens.tolist() == [3, 9, 0, 5, 11, 2, 7]
    for i, n in enumerate(lens):  # row i's new key at position lens[i], the rest untouched
        changed = np.flatnonzero((want[5][i] != args[5][i]).any(axis=(0, 2)))
        assert changed.tolist() == [n]


def _kernel_source(func) -> str:
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl

    ct.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    with ct.cuda_compile_env(target):
        lib = tvm.tirx.build(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target,
                             pipeline=pdl.PIPELINE)
    return lib.imports[0].inspect_source()


@pytest.mark.tvm
@needs_cuda_toolchain
def test_batched_gemvs_are_kernels_of_their_own():
    from kiln.codegen.cuda.kernels import gemv, gemv_mma, gemv_rows

    src = _kernel_source(gemv.swiglu_gemv_kernel(64, 512, "float16", 1e-5, pdl=True))
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)", src))
    assert kernels == {"k_kernel", "k_kernel_1"}  # one row; 2..16 rows on the tensor cores
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in src
    gemv_mma.TENSOR_CORES = False
    try:  # the CUDA-core buckets instead (4, 8, 16 rows); warps=4 passed: a new cache entry
        src = _kernel_source(gemv.swiglu_gemv_kernel(64, 512, "float16", 1e-5, pdl=True,
                                                     warps=gemv.WARPS))
    finally:
        gemv_mma.TENSOR_CORES = True
    kernels = set(re.findall(r"__global__ void __launch_bounds__\(\d+\) (\w+)", src))
    assert len(kernels) == 1 + len(gemv_rows.ROW_BUCKETS) and "mma.sync" not in src


def test_mma_fragment_mapping_computes_x_times_w():
    """gemv_mma's tensor-core kernels, emulated lane by lane in numpy with the PTX fragment
    layouts (kernels/flash_attention.py's docstring): lane 4g + t loads 16 bytes of weight row
    g and of x rows g, g + 8 at k offset 8t of each 32-element step, builds the A/B operands of
    two k16 halves as the kernel does, and the accumulators it holds are y[g + 8i, 2t + e]."""
    rng = np.random.default_rng(0)
    m, n, k = 16, 8, 64
    x, w = rng.standard_normal((m, k)), rng.standard_normal((n, k))
    c = np.zeros((32, 4))
    for step in range(k // 32):
        a_reg, b_reg = np.zeros((32, 2, 8)), np.zeros((32, 2, 4))
        for lane in range(32):
            g, t = divmod(lane, 4)
            kk = step * 32 + t * 8
            xv = np.concatenate([x[g, kk:kk + 8], x[g + 8, kk:kk + 8]])  # xv[i * 8 + v]
            for h in range(2):
                for i in range(2):
                    for j in range(2):
                        for e in range(2):
                            a_reg[lane, h, 2 * i + 4 * j + e] = xv[i * 8 + h * 4 + 2 * j + e]
                b_reg[lane, h] = w[g, kk + h * 4:kk + h * 4 + 4]  # bf[h * 4 + 2j + e]
        for h in range(2):  # mma.m16n8k16: the logical A (16 x 16), B (16 x 8) of the lanes
            a, b = np.zeros((16, 16)), np.zeros((16, 8))
            for lane in range(32):
                g, t = divmod(lane, 4)
                for i in range(2):
                    for j in range(2):
                        for e in range(2):
                            a[g + 8 * i, 2 * t + 8 * j + e] = a_reg[lane, h, 2 * i + 4 * j + e]
                for j in range(2):
                    for e in range(2):
                        b[2 * t + 8 * j + e, g] = b_reg[lane, h, 2 * j + e]
            prod = a @ b
            for lane in range(32):
                g, t = divmod(lane, 4)
                for i in range(2):
                    for e in range(2):
                        c[lane, 2 * i + e] += prod[g + 8 * i, 2 * t + e]
    y = np.zeros((m, n))
    for lane in range(32):
        g, t = divmod(lane, 4)
        for i in range(2):
            for e in range(2):
                y[g + 8 * i, 2 * t + e] = c[lane, 2 * i + e]
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.tvm
def test_row_lengths_are_past_plus_each_rows_offset():
    """The kernel writing each row's cached length (run here compiled for the CPU): rows beyond
    the batch's are not written, offsets beyond them not read."""
    from kiln.codegen.cuda.kernels.attention import row_lengths_kernel

    lib = tvm.compile(row_lengths_kernel(4).with_attr("global_symbol", "f"),
                      target={"kind": "llvm"})
    out = tvm.runtime.tensor(np.full(3, -1, np.int32))
    lib["f"](100, 3, 0, 7, 99, out)
    assert out.numpy().tolist() == [103, 100, 107]
