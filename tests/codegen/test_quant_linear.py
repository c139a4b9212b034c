"""The fused quantized linear kernels against numpy: the same scheme (tight), and fp32 (loose)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter import transformer_ops as ref
from kiln.compiler.ir import Attrs
from kiln.passes.quantize import blocked, pack_nibbles, quantize
from tests.helpers import assert_close

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from kiln.codegen.kernels import quant_linear as ql  # noqa: E402
from kiln.codegen.kernels.packed_linear import PackedConfig  # noqa: E402
from kiln.codegen.targets import host_cpu  # noqa: E402

SCHEMES = {  # name: (bits, group (0: per channel), symmetric)
    "w8": (8, 0, True), "w4": (4, 16, True), "w4a": (4, 16, False), "w8g": (8, 32, False),
}
SHAPES = [  # (n, k, m): odd N (not a multiple of 16), K not a multiple of the group, M tails
    (48, 64, 1), (37, 53, 1), (64, 40, 3), (37, 53, 6), (80, 96, 13), (19, 70, 23),
]


def quantized_operands(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """The kernel's blocked operands and the interpreter attributes for weight w[N, K]."""
    n, k = w.shape
    q, scales, zp = quantize(w, bits=bits, group=group, symmetric=symmetric)
    qw = pack_nibbles(q) if bits == 4 else q
    attrs = Attrs({"bits": bits, "group_size": group or k, "in_features": k,
                   "out_features": n, "layout": "blocked"})
    return blocked(qw), blocked(scales), None if zp is None else blocked(zp), attrs


def compile_kernel(func):
    mod = tvm.IRModule({"f": func.with_attr("global_symbol", "f")})
    return tvm.compile(mod, target=host_cpu().tvm_target())["f"]


def t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_quant_linear_matches_numpy(rng, scheme, n, k, m):
    bits, group, symmetric = SCHEMES[scheme]
    bias = (n + m) % 2 == 1
    w = rng.standard_normal((n, k), dtype=np.float32)
    x = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    qw, sc, zp, attrs = quantized_operands(w, bits, group, symmetric)
    s = ql.QuantScheme(n, k, bits, group or k, zero_points=zp is not None)
    f = compile_kernel(ql.quant_linear_kernel(s, PackedConfig(4, 2), 2, bias=bias))
    y = t(np.full((m, n), np.nan, np.float32))
    f(t(x), t(qw), t(sc), *([t(zp)] if zp is not None else []), *([t(b)] if bias else []), y)
    want = ref.quant_linear([x, qw, sc, zp, b if bias else None], attrs)[0]
    path = "GEMV" if m <= ql.GEMV_ROWS else "GEMM"
    assert_close(y.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                 name=f"{scheme} {path} n={n} k={k} m={m}")
    loose = ref.linear([x, w, b if bias else None], Attrs())[0]  # against fp32: the scheme's
    err = np.abs(y.numpy() - loose).max() / np.abs(loose).max()  # own error, bounded loosely
    assert err < (0.02 if bits == 8 else 0.2), f"{scheme}: {err:.3g} from fp32"


@pytest.mark.parametrize("cfg", [PackedConfig(1, 1), PackedConfig(8, 3), PackedConfig(6, 4)])
@pytest.mark.parametrize("gemv_nv", [1, 4])
def test_quant_linear_tilings(rng, cfg, gemv_nv):
    n, k, group = 16 * 7, 96, 32
    w = rng.standard_normal((n, k), dtype=np.float32)
    qw, sc, _, attrs = quantized_operands(w, 4, group, True)
    f = compile_kernel(ql.quant_linear_kernel(ql.QuantScheme(n, k, 4, group), cfg, gemv_nv))
    for m in (1, 4, 5, 19):
        x = rng.standard_normal((m, k), dtype=np.float32)
        y = t(np.full((m, n), np.nan, np.float32))
        f(t(x), t(qw), t(sc), y)
        want = ref.quant_linear([x, qw, sc], attrs)[0]
        assert_close(y.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                     name=f"w4g32 {cfg} gemv_nv={gemv_nv} m={m}")


def test_bad_scheme_is_refused():
    with pytest.raises(ValueError, match="bad quantization"):
        ql.QuantScheme(16, 16, 3, 16)
    with pytest.raises(ValueError, match="bad quantization"):
        ql.QuantScheme(16, 16, 4, 15)
