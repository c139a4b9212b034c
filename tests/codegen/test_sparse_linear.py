"""The CPU sparse_linear kernels (bitmap layout, fp32 and int8 values) against the numpy spec."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter import transformer_ops as ref
from kiln.compiler.ir import Attrs
from kiln.runtime import sparse_format as sf
from tests.helpers import assert_close, needs_avx2, needs_avx512
from tests.runtime.test_sparse_format import pruned

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm]

from kiln.codegen.kernels import sparse_linear as sl  # noqa: E402
from kiln.codegen.kernels.packed_linear import PackedConfig  # noqa: E402
from tests.codegen.test_quant_linear import compile_kernel, t  # noqa: E402

ROWS = (1, 3, 6, 23)  # GEMV (m <= GEMV_ROWS) and GEMM with row-tile tails


def operands(w: np.ndarray, values: str):
    """(values, meta, scales | None) of w[N, K] in the bitmap layout; int8: per-row codes."""
    scales = None
    if values == "int8":
        scales = np.maximum(np.abs(w).max(1), 1e-6).astype(np.float32) / 127
        w = np.round(w / scales[:, None]).astype(np.int8)
    v, meta = sf.bitmap_encode(w)
    return v, meta, scales


#: (n, k, fraction of zeros, GEMM tile, GEMV panel width, GEMV accumulator chains, GEMV
#: prefetch bytes): odd K (two chains asked, one taken), no zeros, nearly all zeros, panels
#: that divide the blocks and ones that leave a remainder, the default GEMV (one block, two
#: chains) without and with prefetching (Intel's default: past the last block's values too)
CASES = [(48, 64, 0.5, PackedConfig(4, 2), 2, 1, 0), (32, 70, 0.7, PackedConfig(8, 3), 4, 2, 2048),
         (64, 40, 0.0, PackedConfig(8, 3), 3, 4, 0), (16, 33, 0.95, PackedConfig(4, 2), 2, 2, 0),
         (48, 96, 0.7, PackedConfig(4, 2), 1, 2, 0), (48, 96, 0.7, PackedConfig(4, 2), 1, 2, 8192)]


ISAS = [pytest.param(True, id="avx512", marks=needs_avx512),
        pytest.param(False, id="avx2", marks=needs_avx2)]


@pytest.mark.parametrize("avx512", ISAS)
@pytest.mark.parametrize("values", ["float32", "int8"])
@pytest.mark.parametrize(("n", "k", "fraction", "cfg", "nv", "chains", "prefetch"), CASES)
def test_sparse_linear_matches_the_spec(rng, values, n, k, fraction, cfg, nv, chains, prefetch,
                                        avx512):
    bias = k % 2 == 0
    w = pruned(rng, n, k, fraction)
    b = rng.standard_normal(n, dtype=np.float32)
    v, meta, scales = operands(w, values)
    s = sl.SparseShape(n, k, v.shape[1], values)
    attrs = Attrs({"layout": "bitmap", "in_features": k, "out_features": n})
    f = compile_kernel(sl.sparse_linear_kernel(s, cfg, nv, bias=bias, avx512=avx512,
                                              chains=chains, prefetch=prefetch))
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = t(np.full((m, n), np.nan, np.float32))
        f(t(x), t(v), t(meta), *([t(scales)] if scales is not None else []),
          *([t(b)] if bias else []), y)
        want = ref.sparse_linear([x, v, meta, scales, b if bias else None], attrs)[0]
        path = "GEMV" if m <= sl.GEMV_ROWS else "GEMM"
        assert_close(y.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                     name=f"{values} {path} n={n} k={k} m={m} {cfg} nv={nv} chains={chains} "
                          f"prefetch={prefetch}")
