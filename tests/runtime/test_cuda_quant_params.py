"""The runtime synthesizes quantized parameters without the compiler (the GPU host has numpy
only): seeded float weights rounded to nearest in the artifact's scheme, stored as
kiln.passes.quantize stores them, so that the compiler's own numpy dequantization (the
interpreter's quant_linear) reads them as the same weights; bfloat16 synthesized from float32."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter.transformer_ops import dequantize as interp_dequantize
from kiln.passes.quantize import pack_nibbles
from kiln.runtime.params import (
    as_float,
    bfloat16_bits,
    dequantize,
    quantize_rtn,
    synthetic_params,
    to_float32,
)


def _table(n: int, k: int, bits: int, group: int, symmetric: bool, dtype: str) -> list[dict]:
    g = group or k
    qcols = k // 2 if bits == 4 else k
    attrs = {"bits": bits, "group": group, "symmetric": symmetric}
    parts = [("qweight", [n, qcols], "uint8" if bits == 4 else "int8"),
             ("scales", [n, k // g], dtype)] + ([] if symmetric else [
                 ("zero_points", [n, k // g], dtype)])
    table = [{"name": "norm", "shape": [k], "dtype": dtype, "role": "rms_norm.norm.weight",
              "derivation": {"kind": "external"}}]
    for part, shape, dt in parts:
        table.append({"name": f"w.{part}", "shape": shape, "dtype": dt,
                      "role": f"quant_linear.{part}",
                      "derivation": {"kind": "derived", "fn": "quantize",
                                     "attrs": {**attrs, "part": part}, "sources": []}})
    return table


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 64, False), (8, 0, True),
                                                  (8, 32, False)])
def test_synthetic_quantized_params_dequantize_as_the_interpreter_does(bits, group, symmetric):
    n, k = 48, 128
    table = _table(n, k, bits, group, symmetric, "float16")
    a = synthetic_params(table, seed=3)
    for p in table:
        assert list(a[p["name"]].shape) == p["shape"] and str(a[p["name"]].dtype) == p["dtype"]
    zp = a.get("w.zero_points")
    attrs = {"bits": bits, "group_size": group or k, "in_features": k, "out_features": n,
             "layout": "nk"}
    ref = interp_dequantize(a["w.qweight"], a["w.scales"].astype(np.float32),
                            None if zp is None else zp.astype(np.float32), attrs)
    np.testing.assert_array_equal(dequantize(a["w.qweight"], a["w.scales"], zp, bits=bits), ref)
    # the weight it stands for: the seeded float matrix, within the scheme's rounding
    w0 = np.random.default_rng([3, 1]).standard_normal((n, k), dtype=np.float32) / np.sqrt(k)
    err = np.linalg.norm(ref - w0) / np.linalg.norm(w0)
    assert err < (0.12 if bits == 4 else 0.01)
    assert synthetic_params(table, seed=3)["w.qweight"].tobytes() == a["w.qweight"].tobytes()


def test_int4_packing_is_the_compilers():
    w = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    q, s, _ = quantize_rtn(w, bits=4, group=32, symmetric=True)
    unpacked = np.stack([q & 15, q >> 4], axis=-1).reshape(8, 64)
    np.testing.assert_array_equal(pack_nibbles(unpacked), q)
    codes = unpacked.astype(np.int32) - 8
    assert codes.min() >= -8 and codes.max() <= 7 and (codes == -8).any()
    np.testing.assert_allclose(dequantize(q, s, None, bits=4), w, atol=float(np.abs(s).max()))


def test_bfloat16_synthesis_round_trip():
    x = np.random.default_rng(1).standard_normal(4096, dtype=np.float32) * 3
    bits = bfloat16_bits(x)
    back = to_float32(bits)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0 ** -8)  # round to nearest: half an ulp
    # exact values survive, ties go to even
    exact = np.array([1.0, -2.5, 0.0, 1 + 2 ** -7], np.float32)
    np.testing.assert_array_equal(to_float32(bfloat16_bits(exact)), exact)
    tie = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    np.testing.assert_array_equal(to_float32(bfloat16_bits(tie)), [1.0, 1 + 2 ** -6])
    ml = pytest.importorskip("ml_dtypes")
    np.testing.assert_array_equal(bits, x.astype(ml.bfloat16).view(np.uint16))
    b = as_float(x, "bfloat16")
    assert str(b.dtype) == "bfloat16" and np.array_equal(b.view(np.uint16), bits)
    table = [{"name": "w", "shape": [16, 32], "dtype": "bfloat16", "role": "linear.weight"}]
    assert str(synthetic_params(table, seed=0)["w"].dtype) == "bfloat16"
