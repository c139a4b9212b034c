"""Tensor-expression ops for the CUDA target, left unscheduled: the CUDA pipeline fuses them
(FuseOps/FuseTIR: epilogue casts into matmuls, residual adds into norms) and dlight schedules
them (Matmul with tensor cores for fp16, GEMV for decode, Reduction, Fallback).

Reductions accumulate in float32 whatever the storage dtype; outputs are cast back.
"""

from __future__ import annotations

from tvm import te, tirx

from kiln.runtime import quant_format as qf

F32 = "float32"


def nt_matmul(x: te.Tensor, w: te.Tensor, out_dtype: str) -> te.Tensor:
    """y[m, n] = sum_k x[m, k] * w[n, k] (weights as stored: [N, K]), accumulated in
    out_dtype (float32 for half inputs: fp16 tensor cores accumulate in fp32)."""
    m, k = x.shape
    n = w.shape[0]
    r = te.reduce_axis((0, k), name="k")
    return te.compute((m, n), lambda i, j: te.sum(
        x[i, r].astype(out_dtype) * w[j, r].astype(out_dtype), axis=r), name="NT_matmul")


def rms_norm(x: te.Tensor, w: te.Tensor, eps: float) -> te.Tensor:
    """x / sqrt(mean(x^2) + eps) * w per row of x[m, e]; sum of squares in float32."""
    m, e = x.shape
    r = te.reduce_axis((0, e), name="e")
    ss = te.compute((m,), lambda i: te.sum(x[i, r].astype(F32) * x[i, r].astype(F32), axis=r),
                    name="sum_sq")
    inv = tirx.const(1.0 / int(e), F32)
    return te.compute((m, e), lambda i, j: (
        x[i, j].astype(F32) * tirx.rsqrt(ss[i] * inv + tirx.const(eps, F32))
        * w[j].astype(F32)).astype(x.dtype), name="rms_norm")


def silu_mul(gate: te.Tensor, up: te.Tensor) -> te.Tensor:
    """silu(gate) * up in float32 (SwiGLU)."""
    def f(*i):
        g = gate(*i).astype(F32)
        return (g / (tirx.const(1.0, F32) + tirx.exp(-g)) * up(*i).astype(F32)).astype(
            gate.dtype)
    return te.compute(gate.shape, f, name="silu_mul")


def rotary(x: te.Tensor, cos: te.Tensor, sin: te.Tensor, heads: int, head_dim: int,
           interleaved: bool) -> te.Tensor:
    """Rotate the first R dims of each head of x[b, s, H*D] by cos/sin[cb, s, R] (cb: b or 1):
    split halves (x1*c - x2*s, x2*c + x1*s) or interleaved pairs; the rest copies."""
    rot = int(cos.shape[-1])
    half, cb = rot // 2, cos.shape[0]

    def f(b, s, j):
        c = j % head_dim
        ci = tirx.min(b, cb - 1)
        xf = x[b, s, j].astype(F32)
        if interleaved:
            partner = tirx.Select(c % 2 == 0, x[b, s, tirx.min(j + 1, x.shape[2] - 1)],
                                  x[b, s, tirx.max(j - 1, 0)]).astype(F32)
            sign = tirx.Select(c % 2 == 0, tirx.const(-1.0, F32), tirx.const(1.0, F32))
        else:
            partner = tirx.Select(c < half, x[b, s, tirx.min(j + half, x.shape[2] - 1)],
                                  x[b, s, tirx.max(j - half, 0)]).astype(F32)
            sign = tirx.Select(c < half, tirx.const(-1.0, F32), tirx.const(1.0, F32))
        cc = tirx.min(c, rot - 1)
        y = xf * cos[ci, s, cc].astype(F32) + sign * partner * sin[ci, s, cc].astype(F32)
        return tirx.Select(c < rot, y, xf).astype(x.dtype)

    return te.compute(x.shape, f, name="rotary")


def last_position(x: te.Tensor) -> te.Tensor:
    """x[b, s, e] -> x[b, s-1 : s, e]."""
    b, s, e = x.shape
    return te.compute((b, 1, e), lambda i, _, j: x[i, s - 1, j], name="last_position")


def dequantize_nk(q: te.Tensor, scales: te.Tensor, zero_points: te.Tensor | None, *, bits: int,
                  group: int, k: int, dtype: str) -> te.Tensor:
    """W[n, k] in `dtype` from a quantized `nk` weight (kiln.runtime.quant_format): int8 codes,
    or uint8 pairs of nibbles (k = 2j low, 2j + 1 high; stored +8 without zero points)."""
    n = q.shape[0]

    def f(i, j):
        return _dequant(q, scales, zero_points, bits, group, i, j, dtype)

    return te.compute((n, k), f, name="dequantize")


def quant_rows(q: te.Tensor, scales: te.Tensor, zero_points: te.Tensor | None,
               ids: te.Tensor, *, bits: int, group: int, k: int, dtype: str) -> te.Tensor:
    """Rows ids[m] of the dequantized table (a quantized, tied embedding): [m, k]."""
    rows = q.shape[0]

    def f(i, j):
        r = tirx.max(tirx.min(ids[i].astype("int64"), rows - 1), 0)
        return _dequant(q, scales, zero_points, bits, group, r, j, dtype)

    return te.compute((ids.shape[0], k), f, name="quant_embedding")


def _dequant(q, scales, zero_points, bits, group, i, j, dtype):
    """quant_format.dequantize's W[i, j], as TIR."""
    if bits == 4:
        byte = q[i, j // 2].astype("int32")
        code = tirx.bitwise_and(tirx.shift_right(byte, (j % 2 * 4).astype("int32")),
                                qf.NIBBLE_MASK)
    else:
        code = q[i, j].astype("int32")
    zp = (tirx.const(float(qf.default_zero_point(bits)), F32) if zero_points is None
          else zero_points[i, j // group].astype(F32))
    return ((code.astype(F32) - zp) * scales[i, j // group].astype(F32)).astype(dtype)


def quant_nt_matmul(x: te.Tensor, q: te.Tensor, scales: te.Tensor,
                    zero_points: te.Tensor | None, *, bits: int, group: int, k: int,
                    out_dtype: str) -> te.Tensor:
    """nt_matmul(x, dequantize_nk(...)) as one function: dlight's tensor-core Matmul rule
    inlines the dequantize into its shared-memory fetch of the weight tile (the weight is
    dequantized on the fly, never written out). Emitted as two separate functions, FuseOps
    leaves the dequantize a kernel of its own (a scratch weight per call)."""
    w = dequantize_nk(q, scales, zero_points, bits=bits, group=group, k=k, dtype=x.dtype)
    return nt_matmul(x, w, out_dtype)


def nm_decode(values: te.Tensor, meta: te.Tensor, *, k: int) -> te.Tensor:
    """The dense W[n, k] of a 2:4 `nm` weight (kiln.runtime.sparse_format): column 4g + c holds
    values[n, 2g + j] when c is the j-th index of group g's nibble, else zero."""
    n = values.shape[0]
    zero = tirx.const(0, values.dtype)

    def f(i, j):
        g = j // 4
        nib = tirx.bitwise_and(tirx.shift_right(meta[i, g // 2].astype("int32"),
                                                (g % 2 * 4).astype("int32")), 15)
        c = (j % 4).astype("int32")
        return tirx.Select(c == tirx.bitwise_and(nib, 3), values[i, g * 2], tirx.Select(
            c == tirx.shift_right(nib, 2), values[i, g * 2 + 1], zero))

    return te.compute((n, k), f, name="nm_decode")


def sparse_nt_matmul(x: te.Tensor, values: te.Tensor, meta: te.Tensor, *, k: int,
                     out_dtype: str) -> te.Tensor:
    """nt_matmul(x, nm_decode(...)) as one function, as quant_nt_matmul: dlight's tensor-core
    Matmul inlines the 2:4 decode into its shared-memory fetch of the weight tile (the weight
    is decompressed into shared memory, never written out)."""
    return nt_matmul(x, nm_decode(values, meta, k=k), out_dtype)
