"""kiln.runtime.quant_format, the one owner of the quantized weight format: its layout read back
element by element, the quantizer's bounds, and every user sharing its functions."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.runtime import quant_format as qf

SCHEMES = [(4, 32, True), (4, 32, False), (8, 0, True), (8, 0, False), (4, 128, False),
           (8, 64, True)]


def _slow_dequantize(qweight: np.ndarray, scales: np.ndarray, zp: np.ndarray | None,
                     bits: int) -> np.ndarray:
    """The documented layout, one weight at a time in plain Python (an independent reading)."""
    n, groups = scales.shape
    kp = qweight.shape[1] * (2 if bits == 4 else 1)
    g = kp // groups
    w = np.zeros((n, kp), np.float64)
    for r in range(n):
        for k in range(kp):
            if bits == 4:
                byte = int(qweight[r, k // 2])
                code = byte & 0xF if k % 2 == 0 else byte >> 4  # even k: the low nibble
            else:
                code = int(qweight[r, k])
            z = float(zp[r, k // g]) if zp is not None else (8.0 if bits == 4 else 0.0)
            w[r, k] = (code - z) * float(scales[r, k // g])
    return w


@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
def test_dequantize_reads_the_documented_layout(bits, group, symmetric):
    rng = np.random.default_rng(bits * 100 + group)
    n, k = 6, 70  # K not a multiple of the group: padded
    q, s, z = qf.quantize_rtn(rng.standard_normal((n, k), dtype=np.float32), bits=bits,
                              group=group, symmetric=symmetric)
    kp = qf.padded_k(k, group)
    assert q.shape == (n, qf.packed_columns(kp, bits)) and q.dtype == qf.qweight_dtype(bits)
    assert s.shape == (n, qf.groups_of(k, group)[1]) and (z is None) == symmetric
    want = _slow_dequantize(q, s, z, bits)
    got = qf.dequantize(q, s, z, bits=bits)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(qf.dequantize(q, s, z, bits=bits, k=k), got[:, :k])


@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
def test_round_to_nearest_is_within_half_a_step(bits, group, symmetric):
    rng = np.random.default_rng(7 + bits + group)
    w = rng.standard_normal((12, 128), dtype=np.float32) * 0.05
    w[2] = 0  # an all-zero row
    codes, s, z = qf.quantize_codes(w, bits=bits, group=group, symmetric=symmetric)
    lo, hi = qf.code_range(bits, symmetric)
    shift = qf.storage_shift(bits, symmetric)
    assert codes.min() >= lo + shift and codes.max() <= hi + shift
    deq = qf.dequantize(qf.pack_codes(codes, bits), s, z, bits=bits, k=128)
    step = np.repeat(np.abs(s), qf.groups_of(128, group)[0], axis=1)
    err, tol = np.abs(deq - w), 1e-5 * step + 1e-9
    inside = (codes > lo + shift) & (codes < hi + shift)
    assert np.all(err[inside] <= step[inside] / 2 + tol[inside])
    # at the ends: a symmetric scheme's +|peak| rounds to hi, one level short of -lo
    assert np.all(err <= step + tol)
    assert np.all(deq[2] == 0)
    if symmetric:  # the largest weight of each group by magnitude lands on the lowest code
        g = qf.groups_of(128, group)[0]
        peak = np.abs(w.reshape(12, -1, g)).argmax(axis=2)
        pc = np.take_along_axis(codes.reshape(12, -1, g), peak[..., None], axis=2)[..., 0]
        assert np.all(pc[np.arange(12) != 2] == lo + shift)


@pytest.mark.parametrize("bits,group,symmetric", SCHEMES)
def test_clip_search_never_reconstructs_worse(bits, group, symmetric):
    w = np.random.default_rng(3).standard_t(3, (16, 128)).astype(np.float32)  # heavy tails
    g = qf.groups_of(128, group)[0]

    def err(clip):
        q, s, z = qf.quantize_rtn(w, bits=bits, group=group, symmetric=symmetric, clip=clip)
        d = qf.dequantize(q, s, z, bits=bits) - w
        return (d.reshape(16, -1, g) ** 2).sum(axis=2)

    plain, searched = err((1.0,)), err(qf.CLIP_SEARCH)
    assert np.all(searched <= plain * (1 + 1e-6))
    if bits == 4:  # 16 levels: clipping heavy tails pays (at int8 it rarely does)
        assert searched.sum() < plain.sum()


def test_stored_codes_and_offsets():
    codes = np.array([[-8, -1, 0, 7]], np.float32)
    q, zp = qf.store(codes, None, bits=4, symmetric=True)
    assert q.tolist() == [[0, 7, 8, 15]] and zp is None  # +8 (INT4_OFFSET)
    q, zp = qf.store(np.array([[0.0, 255.0]]), np.array([[128.0]]), bits=8, symmetric=False)
    assert q.dtype == np.int8 and q.tolist() == [[-128, 127]] and zp.tolist() == [[0.0]]
    assert qf.default_zero_point(4) == qf.INT4_OFFSET == 8 and qf.default_zero_point(8) == 0
    packed = qf.pack_nibbles(np.array([[1, 2, 3, 15]]))
    assert packed.tolist() == [[0x21, 0xF3]]  # k = 2j low nibble, 2j + 1 high
    np.testing.assert_array_equal(qf.unpack_nibbles(packed), [[1, 2, 3, 15]])
    assert qf.unpacked_columns(qf.packed_columns(64, 4), 4) == 64


def test_blocked_layout_round_trips():
    a = np.random.default_rng(0).standard_normal((37, 5), dtype=np.float32)
    b = qf.blocked(a)
    assert b.shape == (3, 5, qf.LANES) and np.all(b[2, :, 37 - 32:] == 0)
    assert b[1, 4, 3] == a[1 * qf.LANES + 3, 4]
    np.testing.assert_array_equal(qf.unblocked(b, 37), a)


def test_every_user_takes_the_format_from_here():
    """The pass, the runtime, the converter's transforms and the interpreter hold no copies."""
    from kiln.compiler.interpreter.transformer_ops import dequantize as interp_dequantize
    from kiln.compiler.ir import Attrs
    from kiln.passes import gptq, quantize
    from kiln.runtime import convert, params, transforms

    assert params.quantize_codes is qf.quantize_codes and params.quantize_rtn is qf.quantize_rtn
    assert params.dequantize is qf.dequantize and params.pack_nibbles is qf.pack_nibbles
    assert quantize.pack_nibbles is qf.pack_nibbles and quantize.groups_of is qf.groups_of
    assert quantize.blocked is transforms.blocked is qf.blocked and quantize.LANES == qf.LANES
    assert convert.quantize_rtn is qf.quantize_rtn and gptq.qf is qf
    rng = np.random.default_rng(5)
    q, s, z = qf.quantize_rtn(rng.standard_normal((20, 64), dtype=np.float32), bits=4, group=32,
                              symmetric=False)
    attrs = {"bits": 4, "group_size": 32, "in_features": 60, "out_features": 20}
    want = qf.dequantize(q, s, z, bits=4, k=60)
    nk = interp_dequantize(q, s, z, Attrs({**attrs, "layout": "nk"}))
    blk = interp_dequantize(qf.blocked(q), qf.blocked(s), qf.blocked(z),
                            Attrs({**attrs, "layout": "blocked"}))
    np.testing.assert_array_equal(nk, want)
    np.testing.assert_array_equal(blk, want)
