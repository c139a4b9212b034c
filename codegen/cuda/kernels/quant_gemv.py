"""Decode GEMV over weight-only quantized weights (`nk` layout, kiln.runtime.quant_format), CUDA,
hand-scheduled TIR: y[m, n] = x[m, :] . W[n, :] (+ residual[m, n]), optionally with the RMS
norm of x fused in front, as kiln.codegen.cuda.kernels.gemv does for fp16 weights.

    W[n, k] = (q[n, k] - zp[n, k // g]) * scales[n, k // g]
    qweight int8[N, Kp] (bits 8) | uint8[N, Kp / 2] (bits 4: k = 2j low nibble, 2j + 1 high)
    scales, zero_points [N, Kp / g] in the compute dtype; no zero points: zp = 0 (int8) or 8
    (int4 codes are stored +8)

One warp per 1, 2 or 4 weight rows (more where the matrix has rows enough to fill the GPU:
x is then loaded and converted once for all of them); each lane loads 16 bytes of each row per
step (16 int8 or 32 int4 weights, one group's worth at most: g is a multiple of that), several
such loads issued before the first use. Codes become float32 without conversion instructions:
a code c OR-ed into the mantissa of 2^23 is the float 2^23 + c, and one subtraction (of
2^23 + the code offset) leaves c - offset exactly. A lane's dot product with x is taken per
16-byte chunk (one group), scaled once per chunk; with zero points, zp * sum(x) is subtracted
per chunk. float32 accumulation, warp-shuffle row sums.

`math="f16x2"` (fp16 activations) unpacks two codes per instruction instead, the way MARLIN and
FasterTransformer do: a lop3 puts two codes into the low mantissa bits of the half2 (1024, 1024)
(int4: nibbles k and k + 4 of a 32-bit word, or k + 1 and k + 5 shifted left 4, undone by an
exact fma with 1/16; int8: a byte permute), one half2 subtraction of 1024 + the zero point leaves
the codes minus their zero point exactly, a half2 multiply by the group's scale makes them the
weights (as fp16 weights would be stored), and one half2 fma multiplies those with a pair of x
(packed in the same k order once per chunk for all rows). Four half2 products per lane are
summed in fp16, then in float32: the fp16 partial sums are partial dot products of weights
and activations, bounded as the output is (multiplying codes, up to 255 for int8, by
activations in fp16 would overflow on a model's outlier activations). About 2.5 instructions
per weight instead of 4: the int4 GEMV was ALU-bound (benchmarks/RESULTS.md, "CUDA on the
H200 (session 3)"; run 38 in "Session 13").

`swiglu=True` takes a gate/up projection W[2F, k] and writes y[m, F] = silu(gate) * up
instead of its [m, 2F] output (what kernels/gemv.swiglu_gemv_kernel does for fp16 weights):
a warp's rows are the gate rows of its outputs and their up rows F further, so one kernel
replaces the GEMV and the row kernel of the SwiGLU after it in each decode layer.
"""

from __future__ import annotations

import functools

import numpy as np
from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.cuda.kernels import pdl as P
from kiln.codegen.cuda.kernels.sparse_gemv import byte_perm
from kiln.runtime import quant_format as qf

WARPS = 4  # rows per block
MAGIC = 0x4B000000  # the bits of 2^23 as float32
MATHS = ("f32", "f16x2")
#: f16x2 is the default where it applies (the benchmarks' `qf32` variant clears this for A/B)
HALF2 = True
HALF_1024 = 0x6400  # the bits of 1024.0 as float16: codes OR-ed into its mantissa are exact
LOP3_AND_OR = 0xEA  # lop3 truth table of (a & b) | c


def chunk_elems(bits: int) -> int:
    """Weights per 16-byte load of one lane."""
    return 16 if bits == 8 else 32


def supported(bits: int, group: int, k: int) -> bool:
    e = chunk_elems(bits)
    return bits in (4, 8) and group % e == 0 and k % e == 0


def math_ok(math: str, bits: int, dtype: str) -> bool:
    """Whether `math` unpacks these codes: f16x2 needs fp16 activations."""
    return math == "f32" or (math == "f16x2" and dtype == "float16" and bits in (4, 8))


def math_default(bits: int, dtype: str) -> str:
    return "f16x2" if HALF2 and math_ok("f16x2", bits, dtype) else "f32"


def _half2_bits(v: float) -> int:
    """uint32 of the half2 (v, v)."""
    h = int(np.array(v, np.float16).view(np.uint16))
    return h | (h << 16)


def rows_default(n: int, swiglu: bool = False) -> int:
    """Weight rows per warp: x is loaded and converted once for all of them, and a warp keeps
    rows x 16 bytes per step in flight; only where there are rows enough to fill the GPU. A
    SwiGLU kernel's warp takes whole gate/up pairs: two rows at least."""
    rows = next(r for r in (4, 2, 1) if (n % r == 0 and n // r >= 512 * r) or r == 1)
    return max(rows, 2) if swiglu else rows


@functools.cache
def quant_gemv_kernel(n: int, k: int, bits: int, group: int, dtype: str, out_dtype: str, *,
                      zero_points: bool = False, residual: bool = False,
                      norm_eps: float | None = None, swiglu: bool = False, pdl: bool = False,
                      warps: int = WARPS, rows: int | None = None,
                      math: str | None = None) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], (gamma[k],) qweight, scales, (zero_points,) (res[m, n],) y[m, n]):
    `warps` per block, `rows` weight rows per warp (None: rows_default), `math` how codes
    are unpacked and multiplied (None: math_default).

    `swiglu`: W is a gate/up projection [2F, k] (n = 2F) and y[m, F] = silu(g) * u of
    g = x . W[f], u = x . W[F + f], the split and the SwiGLU of kiln.passes.fuse_swiglu in the
    GEMV's epilogue. A warp's rows are then gate/up pairs (see `weight_row`): `rows` = 2r
    covers r outputs, both rows of each dotted with the x loaded once."""
    if not supported(bits, group, k):
        raise ValueError(f"quant_gemv: bits {bits}, group {group}, k {k} not supported")
    math = math_default(bits, dtype) if math is None else math
    if not math_ok(math, bits, dtype):
        raise ValueError(f"quant_gemv: math {math!r} does not take {bits}-bit codes on {dtype}")
    if residual and norm_eps is not None:
        raise ValueError("quant_gemv: a fused norm and a fused residual together are not needed")
    if swiglu and residual:
        raise ValueError("quant_gemv: a SwiGLU output has no residual to add")
    e, f32, u32 = chunk_elems(bits), "float32", "uint32"
    kp = qf.padded_k(k, group)
    ng = kp // group
    qcols, qdtype = qf.packed_columns(kp, bits), qf.qweight_dtype(bits)
    nchunk = k // e  # chunks holding real weights (the padding beyond k is never read)
    steps = -(-nchunk // 32)
    per_word = 32 // bits
    mask = (1 << bits) - 1
    flip = 0x80 if bits == 8 else 0  # int8 codes made unsigned (+128) by an XOR
    # the float 2^23 + stored code, minus this, is the code minus its implied zero point
    offset = float(2 ** 23 + (128 if bits == 8 else 0)
                   + (0 if zero_points else qf.default_zero_point(bits)))
    norm = norm_eps is not None
    xv_n = 16 // {"float16": 2, "bfloat16": 2, "float32": 4}[dtype]  # x elements per 16 bytes

    rows = rows_default(n, swiglu) if rows is None else rows
    if n % rows or (swiglu and rows % 2):
        raise ValueError(f"quant_gemv: {rows} rows per warp do not divide n = {n}"
                         + (" in gate/up pairs" if swiglu else ""))
    pairs_per_warp, f_out = rows // 2, n // 2  # (swiglu)

    def weight_row(warp, r):
        """The weight row of accumulator r of warp `warp`. Plain: the warp's `rows`
        consecutive rows. SwiGLU: the warp computes outputs warp * rows/2 + i (i < rows/2);
        accumulator i holds the gate row of output i, accumulator rows/2 + i its up row,
        F rows further."""
        if swiglu:
            return (warp * pairs_per_warp + r % pairs_per_warp
                    + f_out * (r // pairs_per_warp))
        return warp * rows + r
    # steps whose weights are loaded together: 256 (int8) or 128 (int4) bytes per lane, a
    # compromise between loads in flight and registers (occupancy)
    sg = max(1, min(steps, (16 if bits == 8 else 8) // (rows * 2)))
    groups = -(-steps // sg)
    racc = rows + 3  # accumulators: rows, then chunk sum of x, sum of x^2, chunk dot

    def code(w, slot, idx):
        word = w[slot * 4 + idx // per_word]
        bitsv = T.bitwise_and(T.shift_right(word, T.uint32(bits * (idx % per_word))),
                              T.uint32(mask))
        if flip:
            bitsv = T.bitwise_xor(bitsv, T.uint32(flip))
        return T.reinterpret(f32, T.bitwise_or(bitsv, T.uint32(MAGIC))) - T.float32(offset)

    h2 = math == "f16x2"
    # f16x2: a word's code pairs and the x pairs they meet (element index within the chunk)
    pairs = 4 if bits == 4 else 2  # half2 of codes per 32-bit word
    words_per_sum = 1 if bits == 4 else 2  # four half2 products per fp16 partial sum
    zp_h = 0 if zero_points else qf.default_zero_point(bits)
    lo_c, hi_c = _half2_bits(-(1024 + flip + zp_h)), _half2_bits(-(64 + zp_h))

    def x_slot(j):
        """Where x element j of a chunk sits in the packed pairs: int4 words pair nibbles
        (m, m + 4), so element 8i + m goes to pair 4i + m % 4, half m // 4; int8 pairs
        neighbours."""
        if bits == 8:
            return j
        return 8 * (j // 8) + 2 * (j % 4) + (j % 8) // 4

    def xpair(xh, wi, q):
        return T.reinterpret(u32, xh[T.ramp(2 * (wi * pairs + q), 1, 2)])

    @T.macro
    def half_codes(t, word, lo, hi):
        """t[0:pairs] = the word's codes minus their zero point, as half2."""
        if bits == 4:
            T.ptx.lop3.b32(t[0], word, T.uint32(0x000F000F), T.uint32(HALF_1024 * 0x10001),
                           LOP3_AND_OR)
            T.ptx.lop3.b32(t[1], word, T.uint32(0x00F000F0), T.uint32(HALF_1024 * 0x10001),
                           LOP3_AND_OR)
            T.ptx.lop3.b32(t[2], T.shift_right(word, T.uint32(8)), T.uint32(0x000F000F),
                           T.uint32(HALF_1024 * 0x10001), LOP3_AND_OR)
            T.ptx.lop3.b32(t[3], T.shift_right(word, T.uint32(8)), T.uint32(0x00F000F0),
                           T.uint32(HALF_1024 * 0x10001), LOP3_AND_OR)
            T.ptx.add.f16x2(t[0], t[0], lo)
            T.ptx.fma.rn.f16x2(t[1], t[1], T.uint32(_half2_bits(1 / 16)), hi)
            T.ptx.add.f16x2(t[2], t[2], lo)
            T.ptx.fma.rn.f16x2(t[3], t[3], T.uint32(_half2_bits(1 / 16)), hi)
        else:
            t[0] = byte_perm(T.bitwise_xor(word, T.uint32(0x80808080)), T.uint32(0x64646464),
                         T.uint32(0x4140))
            t[1] = byte_perm(T.bitwise_xor(word, T.uint32(0x80808080)), T.uint32(0x64646464),
                         T.uint32(0x4342))
            T.ptx.add.f16x2(t[0], t[0], lo)
            T.ptx.add.f16x2(t[1], t[1], lo)

    @T.macro
    def dot_half(sc, zp, acc, w, xh, t, hz, hacc, row, slot, grp):
        """acc[rows + 2] = the chunk's weights . x, f16x2: each pair of codes minus its zero
        point (exact) times the group's scale is the pair of weights, then their products
        with x; the fp16 partial sums are partial dot products, bounded as the outputs are."""
        acc[rows + 2] = T.float32(0)
        if zero_points:  # -(1024 + flip + zp) and -(64 + zp): integers, exact in fp16
            hz[0] = T.float16(-(1024 + flip)) - zp[row, grp]
            hz[1] = hz[0]
            if bits == 4:  # (the high nibbles' offset: int8 has none)
                hz[2] = T.float16(-64) - zp[row, grp]
                hz[3] = hz[2]
        hz[6] = sc[row, grp]
        hz[7] = hz[6]
        for wi in T.unroll(4):
            if zero_points:
                half_codes(t, w[slot * 4 + wi], T.reinterpret(u32, hz[T.ramp(0, 1, 2)]),
                           T.reinterpret(u32, hz[T.ramp(2, 1, 2)]))
            else:
                half_codes(t, w[slot * 4 + wi], T.uint32(lo_c), T.uint32(hi_c))
            for q in T.unroll(pairs):
                T.ptx.mul.rn.f16x2(t[q], t[q], T.reinterpret(u32, hz[T.ramp(6, 1, 2)]))
                if q == 0 and wi % words_per_sum == 0:
                    T.ptx.mul.rn.f16x2(hacc[0], t[q], xpair(xh, wi, q))
                else:
                    T.ptx.fma.rn.f16x2(hacc[0], t[q], xpair(xh, wi, q), hacc[0])
            if wi % words_per_sum == words_per_sum - 1:
                hz[T.ramp(4, 1, 2)] = T.reinterpret("float16x2", hacc[0])
                acc[rows + 2] += T.Cast(f32, hz[4]) + T.Cast(f32, hz[5])

    @T.macro
    def rows_dot(x, gamma, qw, sc, zp, acc, w, xv, gv, xf, xh, t, hz, hacc, mi, warp, tx):
        for r in T.unroll(racc):
            acc[r] = T.float32(0)
        for gi in range(groups):
            for s_ in T.unroll(sg):
                if (gi * sg + s_) * 32 + tx < nchunk:
                    for r in T.unroll(rows):
                        w[T.ramp((r * sg + s_) * 4, 1, 4)] = T.reinterpret("uint32x4", qw[
                            weight_row(warp, r), T.ramp(((gi * sg + s_) * 32 + tx) * 16, 1,
                                                        16)])
            if gi == 0:  # the first codes are on their way: now wait for x
                P.wait(pdl)
            for s_ in T.unroll(sg):
                if (gi * sg + s_) * 32 + tx < nchunk:
                    acc[rows] = T.float32(0)
                    for v in T.unroll(e // xv_n):
                        # (h2: x in fp16, in the codes' pair order; its sums are not needed)
                        for lane in T.vectorized(xv_n):
                            xv[lane] = x[mi, ((gi * sg + s_) * 32 + tx) * e + v * xv_n + lane]
                        if norm:
                            for lane in T.vectorized(xv_n):
                                gv[lane] = gamma[((gi * sg + s_) * 32 + tx) * e + v * xv_n
                                                 + lane]
                        for j in T.unroll(xv_n):
                            if norm:
                                acc[rows + 1] += T.Cast(f32, xv[j]) * T.Cast(f32, xv[j])
                            if h2 and norm:
                                xh[x_slot(v * xv_n + j)] = T.Cast(
                                    "float16", T.Cast(f32, xv[j]) * T.Cast(f32, gv[j]))
                            elif h2:
                                xh[x_slot(v * xv_n + j)] = xv[j]
                            elif norm:
                                xf[v * xv_n + j] = T.Cast(f32, xv[j]) * T.Cast(f32, gv[j])
                            else:
                                xf[v * xv_n + j] = T.Cast(f32, xv[j])
                            if zero_points and not h2:
                                acc[rows] += xf[v * xv_n + j]
                    for r in T.unroll(rows):
                        if h2:  # (the scale applied per weight: added as it is)
                            dot_half(sc, zp, acc, w, xh, t, hz, hacc, weight_row(warp, r),
                                     r * sg + s_, ((gi * sg + s_) * 32 + tx) * e // group)
                            acc[r] += acc[rows + 2]
                        else:
                            acc[rows + 2] = T.float32(0)
                            for j in T.unroll(e):
                                acc[rows + 2] += xf[j] * code(w, r * sg + s_, j)
                            if zero_points:
                                acc[rows + 2] -= T.Cast(f32, zp[
                                    weight_row(warp, r), ((gi * sg + s_) * 32 + tx) * e
                                    // group]) * acc[rows]
                            acc[r] += T.Cast(f32, sc[weight_row(warp, r), ((gi * sg + s_)
                                                                           * 32 + tx) * e
                                                     // group]) * acc[rows + 2]
        for off in T.unroll(5):
            for r in T.unroll(rows + 2):
                acc[r] = acc[r] + T.tvm_warp_shuffle_down(T.uint32(0xFFFFFFFF), acc[r],
                                                          16 >> off, 32, 32)
        if norm:
            for r in T.unroll(rows):
                acc[r] = acc[r] * T.rsqrt(acc[rows + 1] / T.float32(k) + T.float32(norm_eps))

    warps_needed = n // rows

    @T.macro
    def body(x, gamma, qw, sc, zp, res, y, m):
        for bx in T.thread_binding((warps_needed + warps - 1) // warps, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    acc = T.decl_buffer((racc,), f32, scope="local")
                    w = T.decl_buffer((rows * sg * 4,), u32, scope="local")
                    xv = T.decl_buffer((xv_n,), dtype, scope="local")
                    gv = T.decl_buffer((xv_n,), dtype, scope="local")
                    xf = T.decl_buffer((e,), f32, scope="local")
                    xh = T.decl_buffer((e,), "float16", scope="local")  # (f16x2)
                    t = T.decl_buffer((4,), u32, scope="local")
                    hz = T.decl_buffer((8,), "float16", scope="local")
                    hacc = T.decl_buffer((1,), u32, scope="local")
                    for mi in range(m):
                        if bx * warps + ty < warps_needed:
                            rows_dot(x, gamma, qw, sc, zp, acc, w, xv, gv, xf, xh, t, hz, hacc,
                                     mi, bx * warps + ty, tx)
                            if swiglu:
                                if tx == 0:  # silu(gate) * up in float32, as silu_mul
                                    for i in T.unroll(pairs_per_warp):
                                        y[mi, (bx * warps + ty) * pairs_per_warp + i] = T.Cast(
                                            out_dtype, acc[i] / (T.float32(1) + T.exp(-acc[i]))
                                            * acc[pairs_per_warp + i])
                            elif tx == 0:
                                for r in T.unroll(rows):
                                    if residual:
                                        y[mi, (bx * warps + ty) * rows + r] = T.Cast(
                                            out_dtype, acc[r] + T.Cast(
                                                f32, res[mi, (bx * warps + ty) * rows + r]))
                                    else:
                                        y[mi, (bx * warps + ty) * rows + r] = T.Cast(
                                            out_dtype, acc[r])

    return _entry(body, n, f_out if swiglu else n, k, ng, qcols, qdtype, dtype, out_dtype,
                  zero_points, residual, norm)


def _entry(body, n, n_out, k, ng, qcols, qdtype, dtype, out_dtype, zero_points, residual,
           norm):
    """The PrimFunc of the variant (TVMScript needs one signature per argument list); y is
    [m, n_out] (n / 2 for SwiGLU)."""
    Q, S, Z = T.Buffer((n, qcols), qdtype), T.Buffer((n, ng), dtype), T.Buffer((n, ng), dtype)
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True}
    if norm and zero_points:
        @T.prim_func(private=True)
        def qgemv_norm_zp(x_h: T.handle, gamma: T.Buffer((k,), dtype), qw: Q, sc: S, zp: Z,
                          y_h: T.handle):
            T.func_attr(attrs)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            y = T.match_buffer(y_h, (m, n_out), out_dtype)
            body(x, gamma, qw, sc, zp, None, y, m)
        return qgemv_norm_zp
    if norm:
        @T.prim_func(private=True)
        def qgemv_norm(x_h: T.handle, gamma: T.Buffer((k,), dtype), qw: Q, sc: S,
                       y_h: T.handle):
            T.func_attr(attrs)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            y = T.match_buffer(y_h, (m, n_out), out_dtype)
            body(x, gamma, qw, sc, None, None, y, m)
        return qgemv_norm
    if zero_points and residual:
        @T.prim_func(private=True)
        def qgemv_zp_residual(x_h: T.handle, qw: Q, sc: S, zp: Z, r_h: T.handle,
                              y_h: T.handle):
            T.func_attr(attrs)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            r = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n_out), out_dtype)
            body(x, None, qw, sc, zp, r, y, m)
        return qgemv_zp_residual
    if zero_points:
        @T.prim_func(private=True)
        def qgemv_zp(x_h: T.handle, qw: Q, sc: S, zp: Z, y_h: T.handle):
            T.func_attr(attrs)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            y = T.match_buffer(y_h, (m, n_out), out_dtype)
            body(x, None, qw, sc, zp, None, y, m)
        return qgemv_zp
    if residual:
        @T.prim_func(private=True)
        def qgemv_residual(x_h: T.handle, qw: Q, sc: S, r_h: T.handle, y_h: T.handle):
            T.func_attr(attrs)
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            r = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n_out), out_dtype)
            body(x, None, qw, sc, None, r, y, m)
        return qgemv_residual

    @T.prim_func(private=True)
    def qgemv(x_h: T.handle, qw: Q, sc: S, y_h: T.handle):
        T.func_attr(attrs)
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n_out), out_dtype)
        body(x, None, qw, sc, None, None, y, m)
    return qgemv
