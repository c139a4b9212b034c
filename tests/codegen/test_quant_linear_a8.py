"""The int8-activation quant_linear kernels (`-a8`) against the numpy spec: the VNNI GEMV
(int8 x int4 -> int32 with vpdpbusd, where the host has AVX-512 VNNI and VBMI) and the float
path every host runs (the activations quantized and dequantized, then the float kernels)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter import transformer_ops as ref
from kiln.compiler.ir import Attrs
from kiln.runtime import quant_format as qf
from tests.helpers import _host_has, assert_close

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from kiln.codegen.kernels import quant_linear as ql  # noqa: E402
from kiln.codegen.kernels.packed_linear import PackedConfig  # noqa: E402
from tests.codegen.test_quant_linear import compile_kernel, t  # noqa: E402

needs_vnni = pytest.mark.skipif(not (_host_has("avx512_vnni") and _host_has("avx512vbmi")),
                                reason="the VNNI GEMV needs avx512_vnni and avx512vbmi")
PATHS = [pytest.param(True, id="vnni", marks=needs_vnni), pytest.param(False, id="float")]
#: (bits, n, k, group, symmetric): whole blocks and a ragged one, asymmetric zero points,
#: per-channel groups (group = k), groups smaller than an activation group; int4 and int8
#: codes; K not a multiple of the activation group (the float path on every host)
CASES = [(4, 48, 64, 32, True), (4, 40, 96, 32, False), (4, 64, 128, 128, True),
         (4, 32, 96, 16, True), (8, 48, 64, 64, True), (8, 40, 96, 32, False),
         (8, 32, 64, 4, True), (4, 32, 80, 16, True), (8, 16, 36, 36, True)]
ROWS = (1, 3, 4, 7, 9)  # GEMV rows (<= GEMV_ROWS), GEMM: tiles of VNNI_MR rows and a tail


@pytest.mark.parametrize("vnni", PATHS)
@pytest.mark.parametrize(("bits", "n", "k", "group", "symmetric"), CASES)
def test_int8_activation_kernels_match_the_spec(rng, vnni, bits, n, k, group, symmetric):
    w = rng.standard_normal((n, k), dtype=np.float32)
    codes, scales, zps = qf.quantize_codes(w, bits=bits, group=group, symmetric=symmetric)
    stored, zps = qf.store(codes, zps, bits=bits, symmetric=symmetric)
    ops = [qf.blocked(qf.pack_codes(stored, bits)), qf.blocked(scales.astype(np.float32))]
    ops += [] if zps is None else [qf.blocked(zps)]
    b = rng.standard_normal(n, dtype=np.float32)
    s = ql.QuantScheme(n, k, bits, group, zero_points=zps is not None, act_bits=8)
    assert s.vnni_gemv == (k % qf.ACT_GROUP == 0)
    f = compile_kernel(ql.quant_linear_kernel(s, PackedConfig(4, 2), 2, bias=True, vnni=vnni))
    attrs = Attrs({"bits": bits, "group_size": group, "in_features": k, "out_features": n,
                   "layout": "blocked", "act_bits": 8})
    for m in ROWS:
        x = rng.standard_normal((m, k), dtype=np.float32) * np.float32(3)
        x[0, :5] = 0  # zeros, and below, a row of zeros (scale 1)
        if m > 2:
            x[2] = 0
        y = t(np.full((m, n), np.nan, np.float32))
        f(t(x), *[t(a) for a in ops], t(b), y)
        want = ref.quant_linear([x, ops[0], ops[1], ops[2] if zps is not None else None, b],
                                attrs)[0]
        assert_close(y.numpy(), want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()),
                     name=f"int{bits} m={m} n={n} k={k} g={group} sym={symmetric}")


def test_the_spec_quantizes_each_row_and_group_symmetrically(rng):
    x = rng.standard_normal((3, 50), dtype=np.float32)  # groups of 32 and a shorter one of 18
    x[1] = 0
    x[2, 40] = 100  # an outlier flattens its own group only
    codes, scale = qf.quantize_rows(x)
    assert codes.shape == x.shape and scale.shape == (3, 2) and codes.dtype == np.int8
    assert (np.abs(codes[0, :32]).max(), np.abs(codes[0, 32:]).max()) == (qf.ACT_MAX,) * 2
    assert (scale[1] == 1).all() and not codes[1].any()
    assert scale[2, 1] > 20 * scale[2, 0]
    fake = qf.fake_quantize_rows(x)
    assert (np.abs(fake - x) <= np.repeat(scale, 32, axis=-1)[:, :50] / 2 * (1 + 1e-6)).all()
    neg_codes, _ = qf.quantize_rows(-x)
    assert (neg_codes == -codes).all()
