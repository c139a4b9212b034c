"""`quant_linear` with dequantization fused into the GEMV (decode) and GEMM (prefill) kernels.

Weights are in kiln.runtime.quant_format's `blocked` layout (B = LANES = 16 fp32 lanes of
AVX-512):
    int8  qw[Np/B, Kp, B]       qw[nb, k, l]  = q[nb*B + l, k]
    int4  qw[Np/B, Kp/2, B]     qw[nb, j, l]  = q[nb*B + l, 2j] | q[nb*B + l, 2j+1] << 4
    scales, zero points [Np/B, G, B]: the B scales of one group are one vector load.
W[n, k] = (q - zp) * scale, zp = quant_format.default_zero_point(bits) (0 for int8, 8 for int4)
unless zero points are given.

GEMV (m <= GEMV_ROWS; decode): tasks own panels of nv column blocks, as in packed_linear. Per
group the kernel accumulates `part += x[k] * float(q)` in vectors (separate chains for the low
and high nibble), with xs = sum of x over the group, then `acc += (part - zp * xs) * scale`:
the zero point and scale cost one vector op per group, not per weight, and only the quantized
bytes stream from memory (no fp32 copy of a weight exists at any time).
GEMM (m > GEMV_ROWS; prefill): each task dequantizes its panel, Kp * nv * B floats (at most a
few hundred KB: L2-sized), into a scratch buffer once, then runs packed_linear's register-tile
micro-kernel over every row tile of x. The dequantization is amortized over m rows; the scratch
is per task, so no fp32 copy of a whole weight is materialized.
N not a multiple of B: the last block is padded in storage and stored lane by lane.
K not a multiple of the group: Kp is padded with zero weights; loops stop at K.

Int8 activations (act_bits 8, the `-a8` presets; spec: quant_format.quantize_rows): x is quantized
per row and group of 32 columns, symmetric, before it meets the weights. On AVX-512 VNNI + VBMI the
GEMV multiplies codes: one 64-byte load holds 4 byte columns of a block (int4: 8 columns, int8: 4),
`vpermb` gathers each row's 4 bytes into its dword, and `vpdpbusd` adds the products of those
(unsigned) bytes with 4 of x's (signed) codes to int32 lanes: 64 multiply-adds an instruction where
the float GEMV does 16, with no conversion of the weights to float. int4 nibbles are masked out of
the bytes (the even and odd columns, against x's codes packed likewise); int8 codes get their sign
bit flipped (+128, taken back with the zero point). The prefill GEMM does the same over tiles of
VNNI_MR rows: each load and permute of weights serves VNNI_MR rows' vpdpbusd. Without VNNI (or
blocks that are not whole chunks) x is replaced by its quantized values in float and the float
kernels run: the same numbers up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.kernels.packed_linear import PackedConfig
from kiln.runtime import quant_format as qf

#: scope of the small accumulator buffers: TVM 0.27 gives "global" ones under 1 KB a stack
#: alloca that LLVM keeps in registers, while "local" ones go through the workspace pool
SMALL = "global"
#: an int4 code's mask in its byte (the TIR reads the format's constant, not a copy of it)
NIBBLE = qf.NIBBLE_MASK
#: at most this many rows run the GEMV path (no scratch); more run the dequantize-panel GEMM
GEMV_ROWS = 4
#: int8 activations on VNNI, prefill: rows sharing each weight load (VNNI_MR x nv int32
#: accumulators stay in registers)
VNNI_MR = 4


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """What the kernel must know about the weights (compile-time constants)."""

    n: int
    k: int
    bits: int
    group: int
    zero_points: bool = False
    act_bits: int = 0  # 8: int8 activations per row and 32 columns (quant_format.quantize_rows)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8) or self.group < 1 or (self.bits == 4 and self.group % 2) \
                or self.act_bits not in (0, 8):
            raise ValueError(f"bad quantization scheme {self}")

    @property
    def vnni_gemv(self) -> bool:
        """Whether the int8-activation GEMV can run on VNNI: whole weight and activation groups,
        their common blocks a multiple of a chunk (8 columns of int4: a vpdpbusd pair; 4 of
        int8: one)."""
        return (self.act_bits == 8 and self.k % self.group == 0 and self.k % qf.ACT_GROUP == 0
                and self.vnni_block % self.vnni_chunk == 0)

    @property
    def vnni_block(self) -> int:
        """Columns of one int32 partial sum: the weight group and the activation group both
        hold whole blocks (one weight scale, one activation scale)."""
        return math.gcd(self.group, qf.ACT_GROUP)

    @property
    def vnni_chunk(self) -> int:
        """Columns one 64-byte load of a block covers: 4 byte columns of 16 rows."""
        return 8 if self.bits == 4 else 4

    @property
    def groups(self) -> int:
        return qf.groups_of(self.k, self.group)[1]

    @property
    def kp(self) -> int:  # padded K
        return qf.padded_k(self.k, self.group)

    @property
    def qcols(self) -> int:  # qweight bytes per row
        return qf.packed_columns(self.kp, self.bits)

    @property
    def qdtype(self) -> str:
        return qf.qweight_dtype(self.bits)

    @property
    def default_zp(self) -> float:
        return float(qf.default_zero_point(self.bits))


def quant_linear_kernel(s: QuantScheme, gemm: PackedConfig, gemv_nv: int, *,
                        bias: bool = False, lanes: int = qf.LANES,
                        vnni: bool = False) -> tirx.PrimFunc:
    """PrimFunc(x[m, K], qw, scales, (zp,) (b[N],) y[m, N]) with m symbolic (int64).

    act_bits 8: x is quantized per row and 32 columns first. With `vnni` (AVX-512 VNNI and
    VBMI) and a scheme the VNNI kernels take (QuantScheme.vnni_gemv), the GEMV and the GEMM
    multiply int8 codes into int32 with vpdpbusd; otherwise x is replaced by its quantized
    values in float32, which the float kernels then use: the same numbers
    (quant_format.fake_quantize_rows)."""
    n, k, G = s.n, s.k, s.groups
    blocks, full = -(-n // lanes), n // lanes
    qcols, qdt = s.qcols, s.qdtype
    gemv = _gemv_panel(s, lanes, bias)
    gemm_panel = _gemm_panel(s, gemm.mr, lanes, bias)
    int_gemv = vnni and s.vnni_gemv and lanes == 16
    if int_gemv:
        vnni_tile, vnni_row = _vnni_panel(s, bias, VNNI_MR), _vnni_panel(s, bias, 1)
        pack_x, C, NB = _pack_rows(s), k // s.vnni_chunk, k // s.vnni_block

    @T.macro
    def spread(body, xb, wb, sb, zb, bb, yb, m, nv):
        # parallel panels of nv full blocks, then the leftover full blocks, then a ragged one
        for p in T.parallel(full // nv):
            body(xb, wb, sb, zb, bb, yb, m, p * nv, nv, False)
        if full % nv > 0:
            body(xb, wb, sb, zb, bb, yb, m, full // nv * nv, full % nv, False)
        if blocks > full:
            body(xb, wb, sb, zb, bb, yb, m, full, 1, True)

    @T.macro
    def float_dispatch(xb, wb, sb, zb, bb, yb, m):
        if m <= GEMV_ROWS:
            spread(gemv, xb, wb, sb, zb, bb, yb, m, gemv_nv)
        else:
            spread(gemm_panel, xb, wb, sb, zb, bb, yb, m, gemm.nv)

    @T.macro
    def fake_dispatch(xb, wb, sb, zb, bb, yb, m):
        xq = T.decl_buffer((m, k), "float32", scope="global")
        fake_quantize(xb, xq, m, k)
        float_dispatch(xq, wb, sb, zb, bb, yb, m)

    @T.macro
    def vnni_rows(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, nb0, nv, ragged):
        # tiles of VNNI_MR rows share each weight load, then the rows left one at a time
        for t in range(m // VNNI_MR):
            vnni_tile(xe, xo, gs, sx, wf, sb, zb, bb, yb, t * VNNI_MR, nb0, nv, ragged)
        for r in range(m // VNNI_MR * VNNI_MR, m):
            vnni_row(xe, xo, gs, sx, wf, sb, zb, bb, yb, r, nb0, nv, ragged)

    @T.macro
    def vnni_panels(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, nv):
        # parallel panels of nv full blocks, then the leftover full blocks, then a ragged one
        for p in T.parallel(full // nv):
            vnni_rows(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, p * nv, nv, False)
        if full % nv > 0:
            vnni_rows(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, full // nv * nv, full % nv, False)
        if blocks > full:
            vnni_rows(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, full, 1, True)

    @T.macro
    def vnni_dispatch(xb, wb, sb, zb, bb, yb, m):
        xe = T.decl_buffer((m * C,), "int32", scope="global")
        xo = T.decl_buffer((m * C,), "int32", scope="global")
        gs = T.decl_buffer((m * NB,), "float32", scope="global")
        sx = T.decl_buffer((m * NB,), "float32", scope="global")
        wf = T.decl_buffer((blocks * qcols * lanes,), qdt, data=wb.data)
        pack_x(xb, xe, xo, gs, sx, m)
        if m <= GEMV_ROWS:
            vnni_panels(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, gemv_nv)
        else:
            vnni_panels(xe, xo, gs, sx, wf, sb, zb, bb, yb, m, gemm.nv)

    @T.macro
    def dispatch(xb, wb, sb, zb, bb, yb, m):
        if s.act_bits == 0:
            float_dispatch(xb, wb, sb, zb, bb, yb, m)
        elif int_gemv:
            vnni_dispatch(xb, wb, sb, zb, bb, yb, m)
        else:
            fake_dispatch(xb, wb, sb, zb, bb, yb, m)

    W, S = T.Buffer((blocks, qcols, lanes), qdt), T.Buffer((blocks, G, lanes), "float32")
    Z, Bias = T.Buffer((blocks, G, lanes), "float32"), T.Buffer((n,), "float32")

    if s.zero_points and bias:

        @T.prim_func(private=True)
        def quant_linear_zp_bias(x_h: T.handle, w: W, sc: S, zp: Z, b: Bias, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, w, sc, zp, b, y, m)

        return quant_linear_zp_bias
    if s.zero_points:

        @T.prim_func(private=True)
        def quant_linear_zp(x_h: T.handle, w: W, sc: S, zp: Z, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, w, sc, zp, None, y, m)

        return quant_linear_zp
    if bias:

        @T.prim_func(private=True)
        def quant_linear_bias(x_h: T.handle, w: W, sc: S, b: Bias, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, w, sc, None, b, y, m)

        return quant_linear_bias

    @T.prim_func(private=True)
    def quant_linear(x_h: T.handle, w: W, sc: S, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        dispatch(x, w, sc, None, None, y, m)

    return quant_linear


def _dequant(s: QuantScheme, wb, nb, kk, lane):
    """float(q[k]) of block nb, lane, at k = kk (any k: picks the nibble for int4)."""
    if s.bits == 8:
        return T.Cast("float32", wb[nb, kk, lane])
    byte = wb[nb, kk // 2, lane]
    return T.Cast("float32", T.bitwise_and(T.shift_right(byte, T.Cast("uint8", (kk % 2) * 4)),
                                           T.uint8(NIBBLE)))


def _gemv_panel(s: QuantScheme, lanes: int, bias: bool):
    k, g, full_groups = s.k, s.group, s.k // s.group
    tail = k - full_groups * g
    zp_on, zp0 = s.zero_points or s.bits == 4, s.default_zp

    @T.macro
    def group_end(sb, zb, acc, part, hi, xs, nb0, nv, gi):
        # acc += (sum x*q - zp * sum x) * scale: zero point and scale once per group
        for j in T.unroll(nv):
            for lane in T.vectorized(lanes):
                if s.zero_points:
                    acc[j * lanes + lane] += (part[j * lanes + lane] + hi[j * lanes + lane]
                                              - zb[nb0 + j, gi, lane] * xs[0]
                                              ) * sb[nb0 + j, gi, lane]
                elif zp_on:
                    acc[j * lanes + lane] += (part[j * lanes + lane] + hi[j * lanes + lane]
                                              - T.float32(zp0) * xs[0]) * sb[nb0 + j, gi, lane]
                else:
                    acc[j * lanes + lane] += (part[j * lanes + lane] + hi[j * lanes + lane]
                                              ) * sb[nb0 + j, gi, lane]

    @T.macro
    def full_group8(xb, wb, part, xs, r, nb0, nv, gi):
        for kk in range(g):
            xv: T.let[T.float32] = xb[r, gi * g + kk]
            if zp_on:
                xs[0] += xv
            for j in T.unroll(nv):
                for lane in T.vectorized(lanes):
                    part[j * lanes + lane] += xv * T.Cast("float32", wb[nb0 + j, gi * g + kk,
                                                                        lane])

    @T.macro
    def full_group4(xb, wb, part, hi, xs, r, nb0, nv, gi):
        for kp in range(g // 2):
            x0: T.let[T.float32] = xb[r, gi * g + 2 * kp]
            x1: T.let[T.float32] = xb[r, gi * g + 2 * kp + 1]
            xs[0] += x0 + x1
            for j in T.unroll(nv):
                for lane in T.vectorized(lanes):
                    # widen the byte once; both nibbles come out of the 32-bit lane
                    part[j * lanes + lane] += x0 * T.Cast("float32", T.bitwise_and(
                        T.Cast("int32", wb[nb0 + j, gi * (g // 2) + kp, lane]), NIBBLE))
                    hi[j * lanes + lane] += x1 * T.Cast("float32", T.shift_right(
                        T.Cast("int32", wb[nb0 + j, gi * (g // 2) + kp, lane]), 4))

    @T.macro
    def panel(xb, wb, sb, zb, bb, yb, m, nb0, nv, ragged):
        acc = T.decl_buffer((nv * lanes,), "float32", scope=SMALL)
        part = T.decl_buffer((nv * lanes,), "float32", scope=SMALL)
        hi = T.decl_buffer((nv * lanes,), "float32", scope=SMALL)
        xs = T.decl_buffer((1,), "float32", scope=SMALL)
        for r in range(m):
            zero(acc, nv, lanes)
            for gi in range(full_groups):
                xs[0] = T.float32(0)
                zero(part, nv, lanes)
                zero(hi, nv, lanes)
                if s.bits == 4:
                    full_group4(xb, wb, part, hi, xs, r, nb0, nv, gi)
                else:
                    full_group8(xb, wb, part, xs, r, nb0, nv, gi)
                group_end(sb, zb, acc, part, hi, xs, nb0, nv, gi)
            if tail > 0:
                xs[0] = T.float32(0)
                zero(part, nv, lanes)
                zero(hi, nv, lanes)
                for kk in range(full_groups * g, k):
                    xv: T.let[T.float32] = xb[r, kk]
                    xs[0] += xv
                    for j in T.unroll(nv):
                        for lane in T.vectorized(lanes):
                            part[j * lanes + lane] += xv * _dequant(s, wb, nb0 + j, kk, lane)
                group_end(sb, zb, acc, part, hi, xs, nb0, nv, full_groups)
            store(bb, yb, acc, r, 1, nb0, nv, ragged, lanes, bias, s.n, nv)

    return panel


def _gemm_panel(s: QuantScheme, mr: int, lanes: int, bias: bool):
    k, kp, g, G = s.k, s.kp, s.group, s.groups

    @T.macro
    def put(scratch, sb, zb, j, nb0, gi, kk, lane, q):
        if s.zero_points:
            scratch[(j * kp + gi * g + kk) * lanes + lane] = (
                q - zb[nb0 + j, gi, lane]) * sb[nb0 + j, gi, lane]
        else:
            scratch[(j * kp + gi * g + kk) * lanes + lane] = (
                q - T.float32(s.default_zp)) * sb[nb0 + j, gi, lane]

    @T.macro
    def dequantize(wb, sb, zb, scratch, nb0, nv):
        # scratch[(j * Kp + k) * lanes + lane] = W[(nb0 + j) * lanes + lane, k]
        for j in range(nv):
            for gi in range(G):
                if s.bits == 4:
                    for kq in range(g // 2):
                        for lane in T.vectorized(lanes):
                            put(scratch, sb, zb, j, nb0, gi, 2 * kq, lane, T.Cast(
                                "float32", T.bitwise_and(wb[nb0 + j, gi * (g // 2) + kq, lane],
                                                         T.uint8(NIBBLE))))
                            put(scratch, sb, zb, j, nb0, gi, 2 * kq + 1, lane, T.Cast(
                                "float32", T.shift_right(wb[nb0 + j, gi * (g // 2) + kq, lane],
                                                         T.uint8(4))))
                else:
                    for kk in range(g):
                        for lane in T.vectorized(lanes):
                            put(scratch, sb, zb, j, nb0, gi, kk, lane,
                                T.Cast("float32", wb[nb0 + j, gi * g + kk, lane]))

    @T.macro
    def micro(xb, scratch, bb, yb, m0, rows, nb0, nv, ragged):
        acc = T.decl_buffer((rows * nv * lanes,), "float32", scope=SMALL)
        zero(acc, rows * nv, lanes)
        for kk in range(k):
            for i in T.unroll(rows):
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        acc[(i * nv + j) * lanes + lane] += xb[m0 + i, kk] * scratch[
                            (j * kp + kk) * lanes + lane]
        store(bb, yb, acc, m0, rows, nb0, nv, ragged, lanes, bias, s.n, nv)

    @T.macro
    def panel(xb, wb, sb, zb, bb, yb, m, nb0, nv, ragged):
        scratch = T.decl_buffer((nv * kp * lanes,), "float32", scope="global")
        dequantize(wb, sb, zb, scratch, nb0, nv)
        for mt in range(m // mr):
            micro(xb, scratch, bb, yb, mt * mr, mr, nb0, nv, ragged)
        for mm in range(m // mr * mr, m):
            micro(xb, scratch, bb, yb, mm, 1, nb0, nv, ragged)

    return panel


# -- int8 activations ---------------------------------------------------------------------------

@T.macro(hygienic=False)
def group_amax(xb, amax, r, k0, k1):
    """amax[0] = max |x[r, k0:k1]|."""
    amax[0] = T.float32(0)
    for kk in range(k0, k1):
        amax[0] = T.max(amax[0], T.abs(xb[r, kk]))


def _act_scale(amax) -> tirx.PrimExpr:
    return T.Select(amax > T.float32(0), amax / T.float32(qf.ACT_MAX), T.float32(1))


def _act_code(v, inv) -> tirx.PrimExpr:
    """float32 rint(v * inv) clipped to +-ACT_MAX."""
    return T.max(T.min(T.nearbyint(v * inv), T.float32(qf.ACT_MAX)), T.float32(-qf.ACT_MAX))


@T.macro(hygienic=False)
def fake_quantize(xb, xq, m, k):
    """xq[r, :] = x[r, :] quantized to int8 per group of ACT_GROUP columns and back
    (quant_format.fake_quantize_rows)."""
    for r in T.parallel(m):
        amax = T.decl_buffer((1,), "float32", scope=SMALL)
        for ag in range((k + qf.ACT_GROUP - 1) // qf.ACT_GROUP):
            group_amax(xb, amax, r, ag * qf.ACT_GROUP, T.min(k, (ag + 1) * qf.ACT_GROUP))
            sc: T.let[T.float32] = _act_scale(amax[0])
            inv: T.let[T.float32] = T.float32(1) / sc
            for kk in range(ag * qf.ACT_GROUP, T.min(k, (ag + 1) * qf.ACT_GROUP)):
                xq[r, kk] = _act_code(xb[r, kk], inv) * sc


def _pack_rows(s: QuantScheme):
    """x's rows as the VNNI GEMV reads them: per chunk of columns, int32 words of four int8
    codes (int4 weights, 8 columns: the even columns in xe, the odd in xo, as the low and high
    nibbles of four weight bytes; int8 weights, 4 columns: xe only), and per block (vnni_block
    columns) the sum of its codes (for the zero point) and its activation group's scale."""
    k, chunk, blk, A = s.k, s.vnni_chunk, s.vnni_block, qf.ACT_GROUP
    C, NB, per_block = k // chunk, k // blk, blk // chunk
    even, odd = ((0, 2, 4, 6), (1, 3, 5, 7)) if s.bits == 4 else ((0, 1, 2, 3), ())

    def word(q, ts):
        b = [T.shift_left(T.bitwise_and(q[t], 255), 8 * i) for i, t in enumerate(ts)]
        return T.bitwise_or(T.bitwise_or(b[0], b[1]), T.bitwise_or(b[2], b[3]))

    def total(q):
        return sum((q[t] for t in range(1, chunk)), q[0])

    @T.macro
    def pack_row(xb, xe, xo, gs, sx, r):
        amax = T.decl_buffer((1,), "float32", scope=SMALL)
        q = T.decl_buffer((chunk,), "int32", scope=SMALL)
        for ag in range(k // A):
            group_amax(xb, amax, r, ag * A, (ag + 1) * A)
            sc: T.let[T.float32] = _act_scale(amax[0])
            inv: T.let[T.float32] = T.float32(1) / sc
            for b in range(A // blk):
                sx[r * NB + ag * (A // blk) + b] = sc
                gs[r * NB + ag * (A // blk) + b] = T.float32(0)
            for c in range(ag * (A // chunk), (ag + 1) * (A // chunk)):
                for t in T.unroll(chunk):
                    q[t] = T.Cast("int32", _act_code(xb[r, c * chunk + t], inv))
                xe[r * C + c] = word(q, even)
                if s.bits == 4:
                    xo[r * C + c] = word(q, odd)
                else:
                    xo[r * C + c] = 0
                gs[r * NB + c // per_block] += T.Cast("float32", total(q))

    @T.macro
    def pack(xb, xe, xo, gs, sx, m):
        # rows in parallel where there are many (prefill); a decode call's few rows serially,
        # no thread-pool launch for them
        if m <= GEMV_ROWS:
            for r in range(m):
                pack_row(xb, xe, xo, gs, sx, r)
        else:
            for r in T.parallel(m):
                pack_row(xb, xe, xo, gs, sx, r)

    return pack


def _transposed_bytes(wf, start) -> tirx.PrimExpr:
    """int32x16: the 64 weight bytes at `start` (4 byte columns x 16 rows, column-major as
    `blocked` stores them) with row l's four bytes in dword l (one vpermb)."""
    p = T.ramp(0, 1, 64)
    index = T.Cast("int8x64", T.floormod(p, 4) * 16 + T.floordiv(p, 4))
    raw = T.reinterpret("int8x64", wf[T.ramp(start, 1, 64)])
    return T.reinterpret("int32x16", T.call_llvm_pure_intrin(
        "int8x64", "llvm.x86.avx512.permvar.qi.512", raw, index))


def _dpbusd(acc, codes, x4) -> tirx.PrimExpr:
    """acc + per dword: sum of its four unsigned bytes of `codes` times the signed bytes of x4."""
    return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                   T.reinterpret("int8x64", codes),
                                   T.reinterpret("int8x64", T.Broadcast(x4, 16)))


def _vnni_panel(s: QuantScheme, bias: bool, rows: int):
    """The int8-activation kernel of `rows` rows and a panel of nv blocks: per chunk and
    block, one 64-byte load and one vpermb, the operands prepared once (int4: the two nibble
    masks; int8: a sign flip, as vpdpbusd multiplies unsigned by signed bytes: q + 128), then
    per row vpdpbusd (int4: two, 128 weights; int8: one, 64 weights). Per vnni_block columns the
    int32 sums become float, (sum - offset * sum of x's codes) * weight scale * activation
    scale, offset the zero point (+ 128 for int8). One row is the decode GEMV; a tile of rows
    (prefill) reuses each load and permute `rows` times."""
    k, g, lanes = s.k, s.group, qf.LANES
    C, NB, per_block = k // s.vnni_chunk, k // s.vnni_block, s.vnni_block // s.vnni_chunk
    qcols, flip, blk = s.qcols, 128 if s.bits == 8 else 0, s.vnni_block
    low = T.Broadcast(T.int32(0x0F0F0F0F), lanes)
    sign = T.Broadcast(T.int32(-0x7F7F7F80), lanes)  # 0x80808080

    @T.macro
    def panel(xe, xo, gs, sx, wf, sb, zb, bb, yb, r0, nb0, nv, ragged):
        acc = T.decl_buffer((rows * nv * lanes,), "float32", scope=SMALL)
        part = T.decl_buffer((rows * nv * lanes,), "int32", scope=SMALL)
        wa = T.decl_buffer((nv * lanes,), "int32", scope=SMALL)  # low nibbles / flipped bytes
        wh = T.decl_buffer((nv * lanes,), "int32", scope=SMALL)  # int4: high nibbles
        zero(acc, rows * nv, lanes)
        for bi in range(NB):
            for t in T.unroll(rows * nv):
                part[T.ramp(t * lanes, 1, lanes)] = T.Broadcast(T.int32(0), lanes)
            for c in range(bi * per_block, (bi + 1) * per_block):
                for j in T.unroll(nv):
                    w4: T.let[T.int32x16] = _transposed_bytes(wf, ((nb0 + j) * qcols + c * 4)
                                                              * lanes)
                    if s.bits == 8:
                        wa[T.ramp(j * lanes, 1, lanes)] = T.bitwise_xor(w4, sign)
                    else:
                        wa[T.ramp(j * lanes, 1, lanes)] = T.bitwise_and(w4, low)
                        wh[T.ramp(j * lanes, 1, lanes)] = T.bitwise_and(
                            T.shift_right(w4, T.Broadcast(T.int32(4), lanes)), low)
                for i in T.unroll(rows):
                    ex: T.let[T.int32] = xe[(r0 + i) * C + c]
                    for j in T.unroll(nv):
                        part[T.ramp((i * nv + j) * lanes, 1, lanes)] = _dpbusd(
                            part[T.ramp((i * nv + j) * lanes, 1, lanes)],
                            wa[T.ramp(j * lanes, 1, lanes)], ex)
                    if s.bits == 4:
                        ox: T.let[T.int32] = xo[(r0 + i) * C + c]
                        for j in T.unroll(nv):
                            part[T.ramp((i * nv + j) * lanes, 1, lanes)] = _dpbusd(
                                part[T.ramp((i * nv + j) * lanes, 1, lanes)],
                                wh[T.ramp(j * lanes, 1, lanes)], ox)
            gi: T.let[T.int32] = bi * blk // g
            for i in T.unroll(rows):
                xsum: T.let[T.float32] = gs[(r0 + i) * NB + bi]
                xsc: T.let[T.float32] = sx[(r0 + i) * NB + bi]
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        if s.zero_points:
                            acc[(i * nv + j) * lanes + lane] += (
                                T.Cast("float32", part[(i * nv + j) * lanes + lane])
                                - (zb[nb0 + j, gi, lane] + T.float32(flip)) * xsum
                            ) * (sb[nb0 + j, gi, lane] * xsc)
                        else:
                            acc[(i * nv + j) * lanes + lane] += (
                                T.Cast("float32", part[(i * nv + j) * lanes + lane])
                                - T.float32(s.default_zp + flip) * xsum
                            ) * (sb[nb0 + j, gi, lane] * xsc)
        store(bb, yb, acc, r0, rows, nb0, nv, ragged, lanes, bias, s.n, nv)

    return panel


@T.macro(hygienic=False)
def store(bb, yb, acc, m0, rows, nb0, nv, ragged, lanes, bias, n, width):
    for i in T.unroll(rows):
        for j in T.unroll(width):
            if ragged:
                for lane in range(lanes):
                    if (nb0 + j) * lanes + lane < n:
                        if bias:
                            yb[m0 + i, (nb0 + j) * lanes + lane] = (
                                acc[(i * width + j) * lanes + lane]
                                + bb[(nb0 + j) * lanes + lane])
                        else:
                            yb[m0 + i, (nb0 + j) * lanes + lane] = acc[
                                (i * width + j) * lanes + lane]
            else:
                for lane in T.vectorized(lanes):
                    if bias:
                        yb[m0 + i, (nb0 + j) * lanes + lane] = (
                            acc[(i * width + j) * lanes + lane] + bb[(nb0 + j) * lanes + lane])
                    else:
                        yb[m0 + i, (nb0 + j) * lanes + lane] = acc[
                            (i * width + j) * lanes + lane]


def quant_embedding_kernel(s: QuantScheme, *, index_dtype: str = "int64", parallel: bool = True,
                           lanes: int = qf.LANES) -> tirx.PrimFunc:
    """PrimFunc(qw, scales, (zp,) ids[m], y[m, K]): dequantized rows of a blocked table.

    The table is a tied LM head's quantized weight: row v is output channel v, a strided
    gather in the blocked layout, dequantized on the fly (a few KB per token)."""
    n, k, g, G = s.n, s.k, s.group, s.groups
    blocks = -(-n // lanes)
    qcols, qdt = s.qcols, s.qdtype
    loop = T.parallel if parallel else T.serial
    W, S = T.Buffer((blocks, qcols, lanes), qdt), T.Buffer((blocks, G, lanes), "float32")
    Z = T.Buffer((blocks, G, lanes), "float32")

    @T.macro
    def rows(wb, sb, zb, ids, y, m):
        for r in loop(m):
            v: T.let[T.int64] = T.max(T.min(T.Cast("int64", ids[r]), n - 1), 0)
            for c in range(k):
                if s.zero_points:
                    y[r, c] = (_dequant(s, wb, v // lanes, c, v % lanes)
                               - zb[v // lanes, c // g, v % lanes]) * sb[v // lanes, c // g,
                                                                          v % lanes]
                else:
                    y[r, c] = (_dequant(s, wb, v // lanes, c, v % lanes)
                               - T.float32(s.default_zp)) * sb[v // lanes, c // g, v % lanes]

    if s.zero_points:

        @T.prim_func(private=True)
        def quant_embedding_zp(w: W, sc: S, zp: Z, ids_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            ids = T.match_buffer(ids_h, (m,), index_dtype)
            y = T.match_buffer(y_h, (m, k), "float32")
            rows(w, sc, zp, ids, y, m)

        return quant_embedding_zp

    @T.prim_func(private=True)
    def quant_embedding(w: W, sc: S, ids_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        ids = T.match_buffer(ids_h, (m,), index_dtype)
        y = T.match_buffer(y_h, (m, k), "float32")
        rows(w, sc, None, ids, y, m)

    return quant_embedding


@T.macro
def zero(buf, vectors, lanes):
    for t in T.unroll(vectors):
        for lane in T.vectorized(lanes):
            buf[t * lanes + lane] = T.float32(0)
