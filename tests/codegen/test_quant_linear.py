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
SHAPES = [(48, 64), (37, 53), (19, 70)]  # (n, k): N not a multiple of 16, K of the group
ROWS = (1, 3, 6, 23)  # GEMV (m <= GEMV_ROWS) and GEMM with row-tile tails


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
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_quant_linear_matches_numpy(rng, scheme, n, k):
    bits, group, symmetric = SCHEMES[scheme]
    bias = n % 2 == 1
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    qw, sc, zp, attrs = quantized_operands(w, bits, group, symmetric)
    s = ql.QuantScheme(n, k, bits, group or k, zero_points=zp is not None)
    f = compile_kernel(ql.quant_linear_kernel(s, PackedConfig(4, 2), 2, bias=bias))
    for m in ROWS:
        check(f, rng, m, w, b if bias else None, (qw, sc, zp), attrs, scheme)


def check(f, rng, m, w, b, operands, attrs, scheme):
    """Run the kernel on seeded x[m, K]: tight against the scheme, loose against fp32."""
    qw, sc, zp = operands
    n, k = w.shape
    bits = attrs["bits"]
    bias = b is not None
    x = rng.standard_normal((m, k), dtype=np.float32)
    y = t(np.full((m, n), np.nan, np.float32))
    f(t(x), t(qw), t(sc), *([t(zp)] if zp is not None else []), *([t(b)] if bias else []), y)
    want = ref.quant_linear([x, qw, sc, zp, b if bias else None], attrs)[0]
    path = "GEMV" if m <= ql.GEMV_ROWS else "GEMM"
    assert_close(y.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                 name=f"{scheme} {path} n={n} k={k} m={m}")
    loose = ref.linear([x, w, b if bias else None], Attrs())[0]  # against fp32: the scheme's
    err = np.abs(y.numpy() - loose).max() / np.abs(loose).max()  # own error, bounded loosely
    assert err < (0.02 if bits == 8 else 0.2), f"{scheme}: {err:.3g} from fp32"


@pytest.mark.parametrize(("cfg", "gemv_nv"), [(PackedConfig(1, 1), 1), (PackedConfig(8, 3), 4),
                                              (PackedConfig(6, 4), 2)])
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


@pytest.mark.parametrize("scheme", ["w8", "w4", "w4a"])
def test_quant_embedding_gathers_dequantized_rows(rng, scheme):
    bits, group, symmetric = SCHEMES[scheme]
    table = rng.standard_normal((37, 53), dtype=np.float32)  # a tied head: [vocab, hidden]
    qw, sc, zp, attrs = quantized_operands(table, bits, group, symmetric)
    s = ql.QuantScheme(37, 53, bits, group or 53, zero_points=zp is not None)
    f = compile_kernel(ql.quant_embedding_kernel(s))
    ids = rng.integers(0, 37, 9)
    y = t(np.full((9, 53), np.nan, np.float32))
    f(t(qw), t(sc), *([t(zp)] if zp is not None else []), t(ids), y)
    want = ref.quant_embedding([qw, sc, zp, ids], attrs)[0]
    assert_close(y.numpy(), want, rtol=1e-6, atol=1e-7, name=f"{scheme} quant_embedding")
