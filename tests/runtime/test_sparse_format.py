"""The sparse layouts (kiln.runtime.sparse_format) and the `sparse_linear` op's numpy spec."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run_node
from kiln.compiler.ir import Attrs, DType, Node, TensorType
from kiln.compiler.shapes import infer
from kiln.runtime import sparse_format as sf
from tests.helpers import assert_close


def pruned(rng, n: int, k: int, fraction: float, dtype=np.float32) -> np.ndarray:
    """Random w[N, K] with round(fraction * K) exact zeros at random places in every row."""
    w = rng.standard_normal((n, k)).astype(dtype)
    zeros = round(fraction * k)
    for row in w:
        row[rng.permutation(k)[:zeros]] = 0
    return w


def two_four(rng, n: int, k: int, dtype=np.float32) -> np.ndarray:
    w = rng.standard_normal((n, k)).astype(dtype)
    g = w.reshape(n, k // 4, 4)
    drop = np.argsort(rng.random(g.shape), axis=-1)[..., :2]
    np.put_along_axis(g, drop, 0, axis=-1)
    return w


def test_nm_layout_is_the_contract():
    # row 0, group 0 keeps columns 1 and 3; group 1 keeps column 2 only (a zero fills slot 0)
    w = np.array([[0, 5, 0, 7, 0, 0, 9, 0]], np.float32)
    values, meta = sf.nm_encode(w)
    assert values.tolist() == [[5, 7, 0, 9]]
    # group 0 nibble: 1 | 3 << 2 = 13; group 1: 0 | 2 << 2 = 8 -> byte 13 | 8 << 4
    assert meta.dtype == np.uint8 and meta.tolist() == [[13 | 8 << 4]]
    assert_close(sf.nm_decode(values, meta, 8), w)


@pytest.mark.parametrize("k", [8, 12, 64])
def test_nm_round_trip(k):
    w = two_four(np.random.default_rng(k), 24, k, np.float16)
    values, meta = sf.nm_encode(w)
    assert values.shape == (24, k // 2) and meta.shape == (24, -(-k // 8))
    assert np.array_equal(sf.nm_decode(values, meta, k), w)
    assert sf.nm_pattern(w) == (2, 4)


def test_nm_refuses_dense_groups():
    with pytest.raises(sf.SparseFormatError, match="not 2:4"):
        sf.nm_encode(np.ones((2, 8), np.float32))
    with pytest.raises(sf.SparseFormatError, match="K % 4"):
        sf.nm_encode(np.zeros((2, 6), np.float32))


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.7, 0.95])
@pytest.mark.parametrize("dtype", [np.float32, np.int8])
def test_bitmap_round_trip(fraction, dtype):
    rng = np.random.default_rng(int(fraction * 100))
    w = pruned(rng, 48, 40, fraction, np.float32)
    if dtype == np.int8:
        w = np.clip(np.round(w * 40), -127, 127).astype(np.int8)
    values, meta = sf.bitmap_encode(w)
    assert meta.shape == (3, 40) and meta.dtype == np.uint16
    assert values.shape == (3, sf.bitmap_capacity(w)) and values.dtype == w.dtype
    assert np.array_equal(sf.bitmap_decode(values, meta), w)
    # the expand-load order: block 0's non-zeros column by column, lane by lane
    wb = w[:16].T
    assert np.array_equal(values[0, :np.count_nonzero(wb)], wb[wb != 0])


def test_bitmap_capacity_is_checked():
    w = pruned(np.random.default_rng(0), 16, 32, 0.5)
    assert sf.bitmap_capacity(w) == 16 * 16 + 16 == sf.bitmap_bound(16, 32, 16)
    values, _ = sf.bitmap_encode(w, capacity=300)
    assert values.shape == (1, 300) and not values[0, 256:].any()
    with pytest.raises(sf.SparseFormatError, match="capacity 271"):
        sf.bitmap_encode(w, capacity=271)


def _node(layout, n, k, **extra):
    return Node("sparse_linear", ("x", "v", "m", "s"), ("y",),
                Attrs({"layout": layout, "in_features": k, "out_features": n, **extra}), "fc")


@pytest.mark.parametrize("layout", ["nm", "bitmap"])
@pytest.mark.parametrize("int8", [False, True])
def test_sparse_linear_spec_is_the_dense_linear(layout, int8):
    rng = np.random.default_rng(7)
    n, k = 32, 48
    w = two_four(rng, n, k) if layout == "nm" else pruned(rng, n, k, 0.6)
    scales = None
    if int8:
        scales = (np.abs(w).max(1) / 127).astype(np.float32)
        w = np.round(w / scales[:, None]).astype(np.int8)
    values, meta = sf.encode(w, layout)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    dense = w.astype(np.float32) * (1 if scales is None else scales[:, None])
    node = _node(layout, n, k)
    inputs = [x, values, meta, scales, bias]
    (y,) = run_node(node, inputs)
    assert_close(y, x @ dense.T + bias, rtol=1e-5, atol=1e-5)
    types = [TensorType(DType.of(a), a.shape) if a is not None else None for a in inputs]
    assert infer(node, types) == [TensorType(DType.f32, (2, 3, n))]


def test_sparse_linear_type_rule_names_the_mismatch():
    node = _node("bitmap", 32, 48)
    types = [TensorType(DType.f32, (1, 48)), TensorType(DType.f32, (2, 100)),
             TensorType(DType.u16, (2, 40))]
    with pytest.raises(KilnError, match=r"fc \(sparse_linear\): bitmap layout"):
        infer(node, types)


def test_synthetic_bitmap_weights_fill_the_layout():
    """`--synthetic-weights` on a CPU sparse artifact: every row keeps (C - 16) / 16 weights."""
    from kiln.runtime.params import synthetic_params

    def entry(part, shape, dtype):
        return {"name": f"w.bitmap.{part}", "shape": shape, "dtype": dtype, "role": "constant",
                "derivation": {"kind": "derived", "fn": "sparse_encode",
                               "attrs": {"layout": "bitmap", "part": part,
                                         "capacity": 16 * 12 + 16},
                               "sources": [{"kind": "external", "path": "m.onnx.data"}]}}

    out = synthetic_params([entry("values", [3, 208], "float32"),
                            entry("meta", [3, 40], "uint16")], seed=5)
    values, meta = out["w.bitmap.values"], out["w.bitmap.meta"]
    assert values.shape == (3, 208) and values.dtype == np.float32 and meta.dtype == np.uint16
    w = sf.bitmap_decode(values, meta)
    assert w.shape == (48, 40) and ((w != 0).sum(1) == 12).all()
