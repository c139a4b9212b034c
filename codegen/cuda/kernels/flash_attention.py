"""Prefill attention on the tensor cores (fp16/bf16): a FlashAttention-2 style kernel written as
TIR with explicit thread bindings and PTX `mma.sync.m16n8k16` (T.ptx_legacy.mma).

Rows are (query, head) pairs of one KV head's group: row r = query * group + head-in-group, so a
block's K/V tiles serve every query head that shares them (GQA: each tile is loaded once per
group, not once per head). A block has WARPS warps of 16 rows each; per key tile of BK keys a
warp computes S = Q K^T (16 x BK) on the tensor cores, the online softmax in registers (row
max/sum across the 4 lanes that hold a row, by warp shuffles), then O += P V with P taken
straight from S's accumulators (the m16n8 accumulator layout of two adjacent key tiles is the
m16k16 operand layout). Scores never leave registers; K/V tiles sit in shared memory, rows
padded by 16 bytes (no bank conflicts for the fragment loads). Causal: a block stops at the
last key its last row sees, the mask is applied per element. fp32 accumulation everywhere.

Fragment layouts (PTX ISA, mma.m16n8k16, lane = 4 * g + t):
    A (16 x 16, row): a[2i + 4j + e] = A[g + 8i, 2t + 8j + e]
    B (16 x 8, col):  b[2j + e]      = B[2t + 8j + e, g]
    C (16 x 8):       c[2i + e]      = C[g + 8i, 2t + e]
Layouts as in kiln.codegen.cuda.kernels.attention: q/out (batch, seq, heads * head_dim),
caches (batch, kv_heads, capacity, head_dim), `past` in a one-element int32 device tensor.
"""

from __future__ import annotations

import functools
import math

from tvm import tirx
from tvm.script import tirx as T

F32_MIN = -3.4028234663852886e38
WARPS = 4  # 16 rows each: 64 (query, head) rows per block
BK = 64  # keys per K/V tile
VEC = 8  # halves per 16-byte load
PTX = {"float16": "fp16", "bfloat16": "bf16"}
#: the operand loads lower.py asks for: ldmatrix (checked and 3% faster at 1B prefill 2048
#: on the H200, run 8) or plain 16/32-bit shared-memory loads
LDSM = True


def supported(head_dim: int, dtype: str) -> bool:
    return dtype in PTX and head_dim % 16 == 0 and head_dim <= 256


def tile_ok(head_dim: int, warps: int, bk: int) -> bool:
    """Whether `warps` warps load a tile of `bk` keys in whole 16-byte vectors per thread,
    the tile is whole m16n8k16 k-steps, and K and V tiles fit in shared memory (227 KB)."""
    chunks = head_dim // VEC
    return (bk % 16 == 0 and bk * chunks % (warps * 32) == 0
            and 2 * bk * (head_dim + VEC) * 2 <= 227 * 1024)


@functools.cache
def flash_prefill_kernel(heads: int, kv_heads: int, head_dim: int, scale: float,
                         dtype: str, *, ldsm: bool = False, warps: int = WARPS,
                         bk: int = BK) -> tirx.PrimFunc:
    """PrimFunc(q[b, s, H*D], k_cache, v_cache, past[1], out[b, s, H*D]), causal. `ldsm`:
    K/V operands from shared memory by ldmatrix (x4, .trans for V) instead of 16/32-bit
    loads; `warps` warps of 16 rows per block, `bk` keys per K/V tile (see tile_ok)."""
    if not supported(head_dim, dtype):
        raise ValueError(f"flash_prefill_kernel: head_dim {head_dim}, {dtype} not supported")
    d, group, hd, f32, ab = head_dim, heads // kv_heads, heads * head_dim, "float32", PTX[dtype]
    stride = d + VEC  # shared row stride in elements (16 bytes of padding)
    chunks = d // VEC  # 16-byte vectors per K/V row
    loads = bk * chunks // (warps * 32)  # per thread per tile (for K, and as many for V)
    if not tile_ok(d, warps, bk):
        raise ValueError(f"flash_prefill_kernel: {warps} warps, {bk}-key tiles, head_dim {d}")
    kd, kb = d // 16, bk // 16  # k-steps of S = Q K^T and of O = P V
    nd, nk = d // 8, bk // 8  # n-tiles of O and of S
    rows_per_block = warps * 16
    scale_log2 = float(scale) * math.log2(math.e)

    def mma(a, a_off, b, b_off, c, c_off):
        return T.ptx_legacy.mma("m16n8k16", "row", "col", ab, ab, "fp32", a.data, a_off,
                                b.data, b_off, c.data, c_off, False, dtype=f32)

    @T.prim_func(private=True)
    def flash_prefill(q_h: T.handle, kc_h: T.handle, vc_h: T.handle,
                      pst: T.Buffer((1,), "int32"), o_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        b, s, cap = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, s, hd), dtype)
        kc = T.match_buffer(kc_h, (b, kv_heads, cap, d), dtype)
        vc = T.match_buffer(vc_h, (b, kv_heads, cap, d), dtype)
        o = T.match_buffer(o_h, (b, s, hd), dtype)
        ntiles: T.let[T.int64] = (s * group + rows_per_block - 1) // rows_per_block
        for blk in T.thread_binding(b * kv_heads * ntiles, thread="blockIdx.x"):
            for ty in T.thread_binding(warps, thread="threadIdx.y"):
                for tx in T.thread_binding(32, thread="threadIdx.x"):
                    ks = T.decl_buffer((bk * stride,), dtype, scope="shared")
                    vs = T.decl_buffer((bk * stride,), dtype, scope="shared")
                    # separate staging vectors for K and V (see attention.py: TVM's codegen
                    # reuses a converted local vector after it was overwritten)
                    ldk = T.decl_buffer((VEC,), dtype, scope="local")
                    ldv = T.decl_buffer((VEC,), dtype, scope="local")
                    qf = T.decl_buffer((kd * 8,), dtype, scope="local")  # Q operand, all of D
                    kf = T.decl_buffer((8,), dtype, scope="local")  # K operands (two n-tiles)
                    vf = T.decl_buffer((8,), dtype, scope="local")  # V operands
                    pf = T.decl_buffer((kb * 8,), dtype, scope="local")  # P operand
                    sacc = T.decl_buffer((nk * 4,), f32, scope="local")
                    oacc = T.decl_buffer((nd * 4,), f32, scope="local")
                    # per row i (g, g + 8): running max, partial sum, tile max, rescale
                    st = T.decl_buffer((8,), f32, scope="local")
                    bi: T.let[T.int64] = blk // (kv_heads * ntiles)
                    kvh: T.let[T.int64] = blk // ntiles % kv_heads
                    tile: T.let[T.int64] = ntiles - 1 - blk % ntiles  # longest first
                    past: T.let[T.int64] = T.Cast("int64", pst[0])
                    r0: T.let[T.int64] = tile * rows_per_block + ty * 16 + tx // 4
                    t2: T.let[T.int32] = tx % 4 * 2
                    g: T.let[T.int32] = tx // 4
                    # keys the block's last row sees
                    kend: T.let[T.int64] = past + T.min(
                        (tile * rows_per_block + rows_per_block - 1) // group, s - 1) + 1
                    for i in T.unroll(2):
                        for kk in T.unroll(kd):
                            for j in T.unroll(2):
                                for e in T.unroll(2):
                                    qf[kk * 8 + i * 2 + j * 4 + e] = q[
                                        bi, T.min((r0 + 8 * i) // group, s - 1),
                                        (kvh * group + (r0 + 8 * i) % group) * d
                                        + kk * 16 + t2 + 8 * j + e]
                        st[i] = T.float32(F32_MIN)
                        st[2 + i] = T.float32(0)
                    for c in T.unroll(nd * 4):
                        oacc[c] = T.float32(0)
                    for kt in range((kend + bk - 1) // bk):
                        for ld in T.unroll(loads):
                            for lane in T.vectorized(VEC):
                                ldk[lane] = kc[bi, kvh, T.min(
                                    kt * bk + (ld * warps * 32 + ty * 32 + tx) // chunks,
                                    kend - 1), (ld * warps * 32 + ty * 32 + tx) % chunks
                                    * VEC + lane]
                            for lane in T.vectorized(VEC):
                                ldv[lane] = vc[bi, kvh, T.min(
                                    kt * bk + (ld * warps * 32 + ty * 32 + tx) // chunks,
                                    kend - 1), (ld * warps * 32 + ty * 32 + tx) % chunks
                                    * VEC + lane]
                            for lane in T.vectorized(VEC):
                                ks[(ld * warps * 32 + ty * 32 + tx) // chunks * stride
                                   + (ld * warps * 32 + ty * 32 + tx) % chunks * VEC
                                   + lane] = ldk[lane]
                            for lane in T.vectorized(VEC):
                                vs[(ld * warps * 32 + ty * 32 + tx) // chunks * stride
                                   + (ld * warps * 32 + ty * 32 + tx) % chunks * VEC
                                   + lane] = ldv[lane]
                        T.tvm_storage_sync("shared")
                        for c in T.unroll(nk * 4):
                            sacc[c] = T.float32(0)
                        if ldsm:  # one ldmatrix.x4: the K operands of two n-tiles
                            for np_ in T.unroll(nk // 2):
                                for kk in T.unroll(kd):
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        False, 4, ".b16", kf.data, 0, ks.access_ptr("r"),
                                        ((np_ * 2 + tx // 16) * 8 + tx % 8) * stride + kk * 16
                                        + tx // 8 % 2 * 8, dtype=dtype))
                                    mma(qf, kk * 8, kf, 0, sacc, np_ * 8)
                                    mma(qf, kk * 8, kf, 4, sacc, np_ * 8 + 4)
                        else:
                            for nt in T.unroll(nk):
                                for kk in T.unroll(kd):
                                    for j in T.unroll(2):
                                        for e in T.unroll(2):
                                            kf[j * 2 + e] = ks[(nt * 8 + g) * stride + kk * 16
                                                               + t2 + 8 * j + e]
                                    mma(qf, kk * 8, kf, 0, sacc, nt * 4)
                        for i in T.unroll(2):
                            st[4 + i] = T.float32(F32_MIN)
                            for nt in T.unroll(nk):
                                for e in T.unroll(2):
                                    sacc[nt * 4 + i * 2 + e] = T.Select(
                                        kt * bk + nt * 8 + t2 + e
                                        <= past + (r0 + 8 * i) // group,
                                        sacc[nt * 4 + i * 2 + e] * T.float32(scale_log2),
                                        T.float32(F32_MIN))
                                    st[4 + i] = T.max(st[4 + i], sacc[nt * 4 + i * 2 + e])
                            for sh in T.unroll(2):
                                st[4 + i] = T.max(st[4 + i], T.tvm_warp_shuffle_xor(
                                    T.uint32(0xFFFFFFFF), st[4 + i], 1 << sh, 32, 32))
                            st[4 + i] = T.max(st[i], st[4 + i])  # the new running max
                            st[6 + i] = T.exp2(st[i] - st[4 + i])  # rescale of the old state
                            st[i] = st[4 + i]
                            st[2 + i] = st[2 + i] * st[6 + i]
                            for nt in T.unroll(nk):
                                for e in T.unroll(2):
                                    sacc[nt * 4 + i * 2 + e] = T.exp2(
                                        sacc[nt * 4 + i * 2 + e] - st[i])
                                    st[2 + i] = st[2 + i] + sacc[nt * 4 + i * 2 + e]
                                    pf[nt // 2 * 8 + i * 2 + nt % 2 * 4 + e] = T.Cast(
                                        dtype, sacc[nt * 4 + i * 2 + e])
                            for nt in T.unroll(nd):
                                for e in T.unroll(2):
                                    oacc[nt * 4 + i * 2 + e] = oacc[nt * 4 + i * 2 + e] * st[
                                        6 + i]
                        if ldsm:  # ldmatrix.x4.trans: the V operands of two n-tiles
                            for np_ in T.unroll(nd // 2):
                                for kk in T.unroll(kb):
                                    T.evaluate(T.ptx_legacy.ldmatrix(
                                        True, 4, ".b16", vf.data, 0, vs.access_ptr("r"),
                                        (kk * 16 + tx // 8 % 2 * 8 + tx % 8) * stride
                                        + (np_ * 2 + tx // 16) * 8, dtype=dtype))
                                    mma(pf, kk * 8, vf, 0, oacc, np_ * 8)
                                    mma(pf, kk * 8, vf, 4, oacc, np_ * 8 + 4)
                        else:
                            for nt in T.unroll(nd):
                                for kk in T.unroll(kb):
                                    for j in T.unroll(2):
                                        for e in T.unroll(2):
                                            vf[j * 2 + e] = vs[(kk * 16 + t2 + 8 * j + e)
                                                               * stride + nt * 8 + g]
                                    mma(pf, kk * 8, vf, 0, oacc, nt * 4)
                        T.tvm_storage_sync("shared")
                    for i in T.unroll(2):
                        for sh in T.unroll(2):
                            st[2 + i] = st[2 + i] + T.tvm_warp_shuffle_xor(
                                T.uint32(0xFFFFFFFF), st[2 + i], 1 << sh, 32, 32)
                        if (r0 + 8 * i) // group < s:
                            for nt in T.unroll(nd):
                                for e in T.unroll(2):
                                    o[bi, (r0 + 8 * i) // group,
                                      (kvh * group + (r0 + 8 * i) % group) * d + nt * 8 + t2
                                      + e] = T.Cast(dtype, oacc[nt * 4 + i * 2 + e] / st[2 + i])

    return flash_prefill
