"""Type rules of the ONNX-level ops: symbolic shapes, known values, and contradictions."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler import shapes
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import DType, Node, TensorType, sym
from kiln.compiler.shapes.onnx_ops import is_unknown, unknown_dim

B, S, P = sym("batch"), sym("seq"), sym("past")
F32, I64 = DType.f32, DType.i64


def t(*dims, dtype=F32):
    return TensorType(dtype, tuple(dims))


def infer(op, types, values=None, n_out=1, **attrs):
    node = Node(op, tuple(f"i{k}" for k in range(len(types))),
                tuple(f"o{k}" for k in range(n_out)), attrs, name="n")
    return shapes.infer(node, types, values)


def dims(*d):
    a = np.empty(len(d), dtype=object)
    a[:] = d
    return a


def test_broadcast_and_compare():
    assert infer("Add", [t(B, S, 64), t(64)])[0] == t(B, S, 64)
    assert infer("Less", [t(B, 1, S), t(S, 1)])[0] == t(B, S, S, dtype=DType.bool)
    assert infer("Where", [t(S, S, dtype=DType.bool), t(1), t(B, 1, S, S)])[0] == t(B, 1, S, S)
    with pytest.raises(KilnError, match=r"node n \(Add\).*do not broadcast"):
        infer("Add", [t(B, 3), t(B, 4)])


def test_matmul_gemm():
    assert infer("MatMul", [t(B, S, 64), t(64, 128)])[0] == t(B, S, 128)
    assert infer("MatMul", [t(64), t(B, 64, 7)])[0] == t(B, 7)
    assert infer("Gemm", [t(4, 3), t(5, 4)], transA=1, transB=1)[0] == t(3, 5)
    with pytest.raises(KilnError, match=r"node n \(MatMul\): inner dimensions differ"):
        infer("MatMul", [t(B, S, 64), t(32, 8)])


def test_reshape_with_known_and_unknown_target():
    x = t(B, S, 64)
    assert infer("Reshape", [x, t(4, dtype=I64)], [None, dims(0, 0, 4, -1)])[0] == \
        t(B, S, 4, 16)
    assert infer("Reshape", [x, t(2, dtype=I64)], [None, dims(B * S, 64)])[0] == t(B * S, 64)
    out = infer("Reshape", [x, t(3, dtype=I64)], [None, None])[0]
    assert out.rank == 3 and all(is_unknown(d) for d in out.shape)
    assert infer("Reshape", [x], shape=(B, S, 8, 8))[0] == t(B, S, 8, 8)
    with pytest.raises(KilnError, match="element counts differ"):
        infer("Reshape", [t(4, 6), t(2, dtype=I64)], [None, np.array([5, -1 + 6])])


def test_concat_split_slice():
    assert infer("Concat", [t(B, 2, P, 16), t(B, 2, S, 16)], axis=2)[0] == t(B, 2, P + S, 16)
    with pytest.raises(KilnError, match="different ranks"):
        infer("Concat", [t(B, 2), t(B, 2, 1)], axis=1)
    outs = infer("Split", [t(B, S, 96)], n_out=3, axis=-1, num_outputs=3)
    assert outs == [t(B, S, 32)] * 3
    ends = dims(S)
    out = infer("Slice", [t(B, P + S, 8), t(1, dtype=I64), t(1, dtype=I64), t(1, dtype=I64)],
                [None, np.array([0]), ends, np.array([1])])[0]
    assert out == t(B, S, 8)
    out = infer("Slice", [t(B, S, 8)], starts=(-1,), ends=(2**63 - 1,), axes=(1,))[0]
    assert out == t(B, 1, 8)


def test_squeeze_unsqueeze_gather_transpose():
    assert infer("Unsqueeze", [t(B, S), t(2, dtype=I64)], [None, np.array([1, -1])])[0] == \
        t(B, 1, S, 1)
    assert infer("Unsqueeze", [t(B, S)], axes=(0,))[0] == t(1, B, S)
    assert infer("Squeeze", [t(B, 1, S)], axes=(1,))[0] == t(B, S)
    assert infer("Gather", [t(256, 64), t(B, S, dtype=I64)])[0] == t(B, S, 64)
    assert infer("Gather", [t(4, dtype=I64), t(dtype=I64)])[0] == t(dtype=I64)
    assert infer("Transpose", [t(B, S, 4, 16)], perm=(0, 2, 1, 3))[0] == t(B, 4, S, 16)


def test_generators_from_values():
    assert infer("Shape", [t(B, S, 64)], start=1)[0] == t(2, dtype=I64)
    assert infer("ConstantOfShape", [t(2, dtype=I64)], [dims(S, P + S)], dtype=DType.bool)[0] \
        == t(S, P + S, dtype=DType.bool)
    three = [t(dtype=I64)] * 3
    assert infer("Range", three, [np.array(P, dtype=object), np.array(P + S, dtype=object),
                                  np.array(1)])[0] == t(S, dtype=I64)
    assert infer("Expand", [t(1, 1, S), t(4, dtype=I64)], [None, dims(B, 1, S, S)])[0] == \
        t(B, 1, S, S)
    assert infer("Tile", [t(B, 3), t(2, dtype=I64)], [None, np.array([1, 2])])[0] == t(B, 6)
    unk = infer("Expand", [t(1, 8), t(2, dtype=I64)], [None, None])[0]
    assert unk.shape[1] == 8 and is_unknown(unk.shape[0])


def test_reductions_norms_attention():
    assert infer("ReduceMean", [t(B, S, 64), t(1, dtype=I64)], [None, np.array([-1])])[0] == \
        t(B, S, 1)
    assert infer("ReduceSum", [t(B, S, 64)], axes=(1,), keepdims=0)[0] == t(B, 64)
    assert infer("ArgMax", [t(B, S, 64)], axis=-1, keepdims=0)[0] == t(B, S, dtype=I64)
    ln = infer("LayerNormalization", [t(B, S, 64), t(64)], n_out=3)
    assert ln[0] == t(B, S, 64) and ln[1] == t(B, S, 1)
    with pytest.raises(KilnError, match="scale does not match"):
        infer("LayerNormalization", [t(B, S, 64), t(32)])
    outs = infer("Attention", [t(B, 4, S, 16), t(B, 2, S, 16), t(B, 2, S, 16), None,
                               t(B, 2, P, 16), t(B, 2, P, 16)], n_out=3)
    assert outs[0] == t(B, 4, S, 16) and outs[1] == t(B, 2, P + S, 16)
    assert infer("TopK", [t(B, 50), t(1, dtype=I64)], [None, np.array([5])], n_out=2)[1] == \
        t(B, 5, dtype=I64)


def test_unknown_dims_are_fresh():
    a, b = unknown_dim(), unknown_dim()
    assert a != b and is_unknown(a + 1) and not is_unknown(S)
