"""`sparse_linear` over the "bitmap" layout: expand-loads in the GEMV and the GEMM (AVX-512, or
AVX2 + BMI2).

Layout (kiln.runtime.sparse_format; B = 16 rows = one fp32 vector):
    meta   [N/B, K] uint16   bit l of meta[nb, k]: W[nb*B + l, k] != 0
    values [N/B, C] f32|i8   block nb's non-zeros in (k, lane) order, zero-padded to C (C holds
                             B values of slack past the largest block)
    scales [N] float32       int8 values only: W[n, k] = code * scales[n]
Per (block, k): a full B-value load at the block's running offset (int8: sign-extended to
int32 by the load), `vexpand` under the mask meta[nb, k] (LLVM turns the bit test of a
broadcast into one kmov) moves its first popcount values to the lanes whose bit is set, and a
FMA masked by the same bits accumulates x[k] times them; the offset advances by the popcount.
The register form of vexpand is used on purpose: AVX-512's memory form (what
`llvm.masked.expandload` becomes) is microcoded on Zen 4, about 3x slower (measured:
benchmarks/RESULTS.md, "Sparsity (session 5)"); the unselected lanes keep the loaded values
(merge-masking, so LLVM cannot fold the load back into the memory form) and the masked FMA
ignores them. Only the non-zeros and one bit per weight stream from memory.

AVX2 has no expand: each half of the block (8 lanes, 8 mask bits) loads 8 values at its offset
and permutes them with `vpermps` (int8: `vpermd`). The permutation comes from the mask by two
BMI2 deposits: pdep(byte, 0x11111111) * 15 is a nibble mask of the set bits, and pdep(0x76543210,
that) deposits the source indices 0, 1, 2, ... into the nibbles of the set lanes; a variable
shift per lane (`vpsrlvd`) spreads the nibbles over the lanes. A second variable shift moves bit l
of the mask into lane l's sign, and `vblendvps` zeroes the lanes whose bit is clear, so the FMA
needs no mask. The second half's offset is the first's plus popcount(low byte).

GEMV (m <= GEMV_ROWS; decode): tasks own panels of nv blocks; per k, one expand-load and one FMA
per block (int8: expand 16 bytes, widen, convert), int8 scales applied once at the end.
GEMM (m > GEMV_ROWS; prefill): each task expands its panel, K * nv * B floats (int8: scaled),
into a scratch buffer once, then runs packed_linear's register-tile micro-kernel over every
row tile of x, as quant_linear's GEMM does: the dense kernel's inner loop, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from kiln.codegen.kernels.packed_linear import PackedConfig
from kiln.codegen.kernels.quant_linear import SMALL, store, zero

#: at most this many rows run the GEMV path (no scratch); more run the expand-panel GEMM
GEMV_ROWS = 4
LANES = 16


@dataclass(frozen=True, slots=True)
class SparseShape:
    """What the kernel must know about the weight (compile-time constants)."""

    n: int
    k: int
    capacity: int  # C: values per block
    values: str = "float32"  # "float32" | "int8" (with per-row scales)

    def __post_init__(self) -> None:
        if self.n % LANES or self.values not in ("float32", "int8") or self.capacity < 1:
            raise ValueError(f"bad sparse linear shape {self}")

    @property
    def blocks(self) -> int:
        return self.n // LANES

    @property
    def scaled(self) -> bool:
        return self.values == "int8"


@T.macro
def lane_bits(bits):
    """bits[l] = 1 << l, stored inside the parallel task: LLVM then sees the constants and turns
    each mask test into one kmov (a vector TVM's CSE hoists out of the task reaches the task as
    an opaque argument, and every test becomes a broadcast and a vptestmd)."""
    for lane in T.unroll(LANES):
        bits[lane] = T.shift_left(T.int32(1), lane)


def mask_of(mb, nb, kk, bits) -> tirx.PrimExpr:
    """The boolx16 mask of column kk of block nb (bits: filled by lane_bits)."""
    return tirx.NE(T.bitwise_and(T.Broadcast(T.Cast("int32", mb[nb, kk]), LANES),
                                 bits[T.ramp(0, 1, LANES)]), T.Broadcast(T.int32(0), LANES))


def expand(s: SparseShape, vb, nb, off, mask) -> tirx.PrimExpr:
    """float32x16: lane l holds W[nb*LANES + l, kk] where `mask` (mask_of(mb, nb, kk, .)) has
    its bit set (int8 codes converted, unscaled) and garbage elsewhere: callers mask with the
    same expression object (one kmov; two equal expressions become two vector tests)."""
    if s.values == "float32":
        packed = vb[nb, T.ramp(off, 1, LANES)]
        return T.call_llvm_pure_intrin("float32x16", "llvm.x86.avx512.mask.expand", packed,
                                       packed, mask)
    packed = T.Cast("int32x16", vb[nb, T.ramp(off, 1, LANES)])
    return T.Cast("float32x16", T.call_llvm_pure_intrin(
        "int32x16", "llvm.x86.avx512.mask.expand", packed, packed, mask))


def _pdep(a, b) -> tirx.PrimExpr:
    return T.call_llvm_pure_intrin("uint32", "llvm.x86.bmi.pdep.32", a, b)


def _expand_half(s: SparseShape, vb, nb, off, byte) -> tirx.PrimExpr:
    """float32x8: the 8 values at `off` expanded under the 8 bits of `byte` (uint32), lanes
    whose bit is clear zero (AVX2 + BMI2)."""
    half = LANES // 2
    nibbles = _pdep(T.uint32(0x76543210), _pdep(byte, T.uint32(0x11111111)) * T.uint32(15))
    index = T.reinterpret("int32x8", T.shift_right(T.Broadcast(nibbles, half),
                                                    T.ramp(T.uint32(0), T.uint32(4), half)))
    sign = T.shift_left(T.Broadcast(T.Cast("int32", byte), half), T.ramp(31, -1, half))
    if s.values == "float32":
        v = T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps",
                                    vb[nb, T.ramp(off, 1, half)], index)
    else:
        v = T.Cast("float32x8", T.call_llvm_pure_intrin(
            "int32x8", "llvm.x86.avx2.permd", T.Cast("int32x8", vb[nb, T.ramp(off, 1, half)]),
            index))
    return T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.blendv.ps.256",
                                   T.Broadcast(T.float32(0), half), v,
                                   T.reinterpret("float32x8", sign))


def expand_avx2(s: SparseShape, vb, nb, off, word) -> tirx.PrimExpr:
    """float32x16: lane l holds W[nb*LANES + l, kk] (int8 codes converted, unscaled), zero where
    bit l of `word` (meta[nb, kk]) is clear."""
    w = T.Cast("uint32", word)
    low = T.bitwise_and(w, T.uint32(0xFF))
    return tirx.Shuffle(
        [_expand_half(s, vb, nb, off, low),
         _expand_half(s, vb, nb, off + T.Cast("int32", T.popcount(low)), T.shift_right(
             w, T.uint32(8)))], [T.int32(i) for i in range(LANES)])


def _count(mb, nb, kk) -> tirx.PrimExpr:
    return T.Cast("int32", T.popcount(mb[nb, kk]))


def sparse_linear_kernel(s: SparseShape, gemm: PackedConfig, gemv_nv: int, *,
                         bias: bool = False, avx512: bool = True, chains: int = 1,
                         prefetch: int = 0) -> tirx.PrimFunc:
    """PrimFunc(x[m, K], values, meta, (scales[N],) (b[N],) y[m, N]), m symbolic (int64);
    `avx512`: AVX-512's vexpand, else AVX2 + BMI2's permutes; `prefetch`: the GEMV's software
    prefetch distance in bytes (0: none)."""
    n, k, blocks = s.n, s.k, s.blocks
    gemv = _gemv_panel(s, bias, avx512, chains, prefetch)
    gemm_panel = _gemm_panel(s, gemm.mr, bias, avx512)

    @T.macro
    def spread(body, xb, vb, mb, sb, bb, yb, m, nv):
        for p in T.parallel(blocks // nv):
            body(xb, vb, mb, sb, bb, yb, m, p * nv, nv)
        if blocks % nv > 0:
            body(xb, vb, mb, sb, bb, yb, m, blocks // nv * nv, blocks % nv)

    @T.macro
    def dispatch(xb, vb, mb, sb, bb, yb, m):
        if m <= GEMV_ROWS:
            spread(gemv, xb, vb, mb, sb, bb, yb, m, gemv_nv)
        else:
            spread(gemm_panel, xb, vb, mb, sb, bb, yb, m, gemm.nv)

    V, M = T.Buffer((blocks, s.capacity), s.values), T.Buffer((blocks, k), "uint16")
    S, Bias = T.Buffer((n,), "float32"), T.Buffer((n,), "float32")

    if s.scaled and bias:

        @T.prim_func(private=True)
        def sparse_linear_scaled_bias(x_h: T.handle, v: V, mt: M, sc: S, b: Bias,
                                      y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, v, mt, sc, b, y, m)

        return sparse_linear_scaled_bias
    if s.scaled:

        @T.prim_func(private=True)
        def sparse_linear_scaled(x_h: T.handle, v: V, mt: M, sc: S, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, v, mt, sc, None, y, m)

        return sparse_linear_scaled
    if bias:

        @T.prim_func(private=True)
        def sparse_linear_bias(x_h: T.handle, v: V, mt: M, b: Bias, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), "float32")
            y = T.match_buffer(y_h, (m, n), "float32")
            dispatch(x, v, mt, None, b, y, m)

        return sparse_linear_bias

    @T.prim_func(private=True)
    def sparse_linear(x_h: T.handle, v: V, mt: M, y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        dispatch(x, v, mt, None, None, y, m)

    return sparse_linear


def _gemv_panel(s: SparseShape, bias: bool, avx512: bool, chains: int = 1, prefetch: int = 0):
    """`chains` accumulators per block, taking the columns in turn (k % chains == 0), summed
    before the store: more FMAs in flight than the panel's nv blocks alone give. `prefetch`:
    each column's step also prefetches the values stream that many bytes ahead of its offset
    (0: none)."""
    k, lanes = s.k, LANES
    ahead = prefetch // (4 if s.values == "float32" else 1)  # in values
    width = gemv_chains(s, chains)

    @T.macro
    def step(xb, vb, mb, acc, off, bits, r, kk, c, nb0, nv):
        xv: T.let[T.float32] = xb[r, kk]
        for j in T.unroll(nv):
            if ahead > 0:  # the values stream `prefetch` bytes on (past the block: harmless)
                T.evaluate(T.call_llvm_intrin(
                    "void", "llvm.prefetch.p0",
                    vb.access_ptr("r", offset=(nb0 + j) * s.capacity + off[j] + ahead),
                    T.uint32(0), T.uint32(3), T.uint32(1)))
            a = T.ramp((c * nv + j) * lanes, 1, lanes)
            if avx512:
                m = mask_of(mb, nb0 + j, kk, bits)
                acc[a] = T.Select(m, acc[a] + T.Broadcast(xv, lanes)
                                  * expand(s, vb, nb0 + j, off[j], m), acc[a])
            else:
                acc[a] = acc[a] + T.Broadcast(xv, lanes) * expand_avx2(
                    s, vb, nb0 + j, off[j], mb[nb0 + j, kk])
            off[j] = off[j] + _count(mb, nb0 + j, kk)

    @T.macro
    def panel(xb, vb, mb, sb, bb, yb, m, nb0, nv):
        acc = T.decl_buffer((width * nv * lanes,), "float32", scope=SMALL)
        off = T.decl_buffer((nv,), "int32", scope=SMALL)
        bits = T.decl_buffer((lanes,), "int32", scope=SMALL)
        lane_bits(bits)
        for r in range(m):
            zero(acc, width * nv, lanes)
            for j in T.unroll(nv):
                off[j] = 0
            for kc in range(k // width):
                for c in T.unroll(width):
                    step(xb, vb, mb, acc, off, bits, r, kc * width + c, c, nb0, nv)
            for c in T.unroll(1, width):
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        acc[j * lanes + lane] += acc[(c * nv + j) * lanes + lane]
            if s.scaled:
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        acc[j * lanes + lane] *= sb[(nb0 + j) * lanes + lane]
            store(bb, yb, acc, r, 1, nb0, nv, False, lanes, bias, s.n, nv)

    return panel


def gemv_chains(s: SparseShape, chains: int) -> int:
    """The accumulator chains a GEMV over K = s.k takes: `chains`, or 1 where it does not
    divide K."""
    return chains if chains > 1 and s.k % chains == 0 else 1


def _gemm_panel(s: SparseShape, mr: int, bias: bool, avx512: bool):
    k, lanes = s.k, LANES

    @T.macro
    def unpack(vb, mb, sb, scratch, nb0, nv):
        # scratch[(j * K + k) * lanes + lane] = W[(nb0 + j) * lanes + lane, k]
        off = T.decl_buffer((1,), "int32", scope=SMALL)
        bits = T.decl_buffer((lanes,), "int32", scope=SMALL)
        lane_bits(bits)
        for j in range(nv):
            off[0] = 0
            for kk in range(k):
                if avx512:
                    m = mask_of(mb, nb0 + j, kk, bits)
                    scratch[T.ramp((j * k + kk) * lanes, 1, lanes)] = T.Select(
                        m, expand(s, vb, nb0 + j, off[0], m), T.Broadcast(T.float32(0), lanes))
                else:
                    scratch[T.ramp((j * k + kk) * lanes, 1, lanes)] = expand_avx2(
                        s, vb, nb0 + j, off[0], mb[nb0 + j, kk])
                if s.scaled:
                    scratch[T.ramp((j * k + kk) * lanes, 1, lanes)] = scratch[T.ramp(
                        (j * k + kk) * lanes, 1, lanes)] * sb[T.ramp((nb0 + j) * lanes, 1, lanes)]
                off[0] = off[0] + _count(mb, nb0 + j, kk)

    @T.macro
    def micro(xb, scratch, bb, yb, m0, rows, nb0, nv):
        acc = T.decl_buffer((rows * nv * lanes,), "float32", scope=SMALL)
        zero(acc, rows * nv, lanes)
        for kk in range(k):
            for i in T.unroll(rows):
                for j in T.unroll(nv):
                    for lane in T.vectorized(lanes):
                        acc[(i * nv + j) * lanes + lane] += xb[m0 + i, kk] * scratch[
                            (j * k + kk) * lanes + lane]
        store(bb, yb, acc, m0, rows, nb0, nv, False, lanes, bias, s.n, nv)

    @T.macro
    def panel(xb, vb, mb, sb, bb, yb, m, nb0, nv):
        scratch = T.decl_buffer((nv * k * lanes,), "float32", scope="global")
        unpack(vb, mb, sb, scratch, nb0, nv)
        for mt in range(m // mr):
            micro(xb, scratch, bb, yb, mt * mr, mr, nb0, nv)
        for mm in range(m // mr * mr, m):
            micro(xb, scratch, bb, yb, mm, 1, nb0, nv)

    return panel
