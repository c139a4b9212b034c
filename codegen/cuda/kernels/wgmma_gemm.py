"""Prefill GEMM on Hopper's warpgroup tensor cores (`wgmma.mma_async`, sm_90a): the `mma`
"wgmma" configs of the schedule space cuda.gemm (fp16 or bf16, no bias; `kiln tune` measures
them beside the WMMA tiles). On an H100 it ran 1.2-2.1x dlight's GEMMs at the 1B shape's 2048-row
prefill GEMMs (benchmarks/gpu/gemm_bench.py, run 30).

    y[m, n] = epilogue(x[m, k] . w[n, k])   fp16/bf16 in, fp32 accumulation, epilogue as gemm.py's

A block of two warpgroups (256 threads) computes a 128 x `bn` tile of y, each warpgroup 64 rows,
in k tiles of 64: per k tile, four `wgmma.m64n{bn}k16` per warpgroup read both operands from
shared memory through matrix descriptors, the accumulators (bn / 2 floats per thread) stay in
registers for the whole k loop. Operand tiles are stored K-major with the 128-byte swizzle (the
16-byte chunk c of row r at chunk c ^ (r % 8) of its 128-byte row; tiles 1024-byte aligned), so
one descriptor (stride 1024 bytes per 8 rows) addresses a whole tile and the k16 steps advance its
start by 32 bytes. Tiles arrive by `cp.async` (every thread 16 bytes at a time), `stages` k tiles
in flight; after a tile lands, a barrier and a proxy fence make it visible to the tensor cores.
Rows of x beyond m are loaded clamped and never stored.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

#: DEFAULT is the cuda.gemm default of fp16/bf16 bias-free GEMMs on sm_90a targets (an A/B
#: switch: benchmarks/gpu/cuda_llm.py's `nowgmma` variants clear it). The staged 128 x 128 tile
#: with 3 k tiles in flight was the best config or within 10% of it on each 1B GEMM (run 34);
#: end to end it gave prefill 1.46x (128 tokens) and 1.74x (2048) over dlight (run 43)
WGMMA = True
DEFAULT = {"bn": 128, "stages": 3, "inflight": 0, "staged": True}
BM, BK = 128, 64  # block rows (two warpgroups of 64), k tile (one 128-byte row of fp16)
THREADS = 256
SWIZZLE_128B = 1  # the descriptor's layout type for the 128-byte swizzle (bits 62-63)


def supported(n: int, k: int, dtype: str, bn: int = 128) -> bool:
    return dtype in PTX_TYPES and n % bn == 0 and k % BK == 0 and bn in (64, 128, 256)


def shared_bytes(bn: int, stages: int) -> int:
    return stages * (BM + bn) * BK * 2 + 1024  # + alignment slack


def _pitch(bn: int) -> int:
    """Row pitch (elements) of the staged output tile: rows 16 bytes apart from any bank, so a
    warp's fragment writes (8 rows x 4 threads) hit 32 distinct banks."""
    return bn + 8


def staged_fits(bn: int, stages: int, out_dtype: str) -> bool:
    """Whether the staged output tile fits in the operand tiles' shared memory it reuses."""
    out_bytes = 4 if out_dtype == "float32" else 2
    return BM * _pitch(bn) * out_bytes <= stages * (BM + bn) * BK * 2


def config_ok(n: int, k: int, dtype: str, out_dtype: str, *, bn: int, stages: int,
              inflight: int, staged: bool) -> bool:
    """Whether wgmma_gemm_kernel builds this GEMM with this config."""
    return (supported(n, k, dtype, bn) and inflight in (0, 1) and 2 + inflight <= stages <= 6
            and (not staged or staged_fits(bn, stages, out_dtype)))


def _smem_addr(ptr) -> tirx.PrimExpr:
    from tvm.backend.cuda.op import cuda_cvta_generic_to_shared

    return cuda_cvta_generic_to_shared(ptr)


def _desc(addr) -> tirx.PrimExpr:
    """The wgmma matrix descriptor of a K-major, 128-byte-swizzled tile at shared address
    `addr` (uint32): start >> 4, leading offset 1 (unused by swizzled K-major), stride 1024 >> 4
    (8 rows of 128 bytes), layout type 128B swizzle."""
    u64 = "uint64"
    start = T.Cast(u64, T.shift_right(T.bitwise_and(addr, T.uint32(0x3FFFF)), T.uint32(4)))
    return (start | T.shift_left(T.uint64(1), T.uint64(16))
            | T.shift_left(T.uint64(1024 >> 4), T.uint64(32))
            | T.shift_left(T.uint64(SWIZZLE_128B), T.uint64(62)))


#: operand dtypes and their PTX type (both operands alike; fp32 accumulation)
PTX_TYPES = {"float16": "f16", "bfloat16": "bf16"}


def _wgmma(bn: int, dtype: str, acc, a_desc, b_desc, accumulate):
    ab = PTX_TYPES[dtype]
    op = getattr(getattr(getattr(T.ptx.wgmma.mma_async.sync.aligned, f"m64n{bn}k16").f32, ab), ab)
    return op(*[acc[i] for i in range(bn // 2)], a_desc, b_desc, T.ptx.pred(accumulate),
              1, 1, 0, 0)


@functools.cache
def wgmma_gemm_kernel(n: int, k: int, dtype: str, out_dtype: str, *, residual: bool = False,
                      bn: int = 128, stages: int = 3, inflight: int = 0,
                      staged: bool = False) -> tirx.PrimFunc:
    """PrimFunc(x[m, k], w[n, k], (res[m, n],) y[m, n]), m dynamic. `stages` k tiles in shared
    memory; `inflight` 1: a k tile's wgmma still runs while the next one's are issued (one
    stage fewer loads ahead). `staged`: the output tile goes through shared memory and leaves
    in 16-byte rows (the residual read likewise) instead of each thread's 2-byte elements
    from its accumulator fragment, 8 rows apart per warp."""
    if not config_ok(n, k, dtype, out_dtype, bn=bn, stages=stages, inflight=inflight,
                     staged=staged):
        raise ValueError(f"wgmma_gemm_kernel: n {n}, k {k}, {dtype}, bn {bn}, stages {stages}"
                         f"{', staged' if staged else ''}")
    kts = k // BK
    a_elems, b_elems = BM * BK, bn * BK  # one stage's tiles, in elements
    stage = a_elems + b_elems
    a_loads, b_loads = a_elems // 8 // THREADS, b_elems // 8 // THREADS  # 16-byte chunks each
    f32, tiles_n = "float32", n // bn

    def swz(r, ch):  # element offset of 16-byte chunk ch of row r in a 128-byte-swizzled tile
        return r * BK + T.bitwise_xor(ch, r % 8) * 8

    @T.macro
    def load(x, w, sm, pad, m, m0, n0, tx, st, kt):
        for i in T.unroll(a_loads):
            q: T.let[T.int32] = tx + THREADS * i
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                sm.ptr_to([pad + st * stage + swz(q // 8, q % 8)]),
                x.ptr_to([T.min(m0 + q // 8, m - 1), kt * BK + q % 8 * 8]), 16))
        for i in T.unroll(b_loads):
            q: T.let[T.int32] = tx + THREADS * i
            T.evaluate(T.ptx["cp.async.cg.shared.global"](
                sm.ptr_to([pad + st * stage + a_elems + swz(q // 8, q % 8)]),
                w.ptr_to([n0 + q // 8, kt * BK + q % 8 * 8]), 16))

    ahead = stages - 1 - inflight  # k tiles loaded ahead of the one multiplied

    @T.macro
    def mainloop(x, w, sm, acc, m, m0, n0, tx):
        base: T.let[T.uint32] = _smem_addr(sm.ptr_to([0]))
        pad: T.let[T.int32] = T.Cast("int32", (T.uint32(1024) - base % T.uint32(1024))
                                     % T.uint32(1024) // T.uint32(2))
        for s in T.unroll(ahead):
            if s < kts:
                load(x, w, sm, pad, m, m0, n0, tx, s, s)
            T.evaluate(T.ptx["cp.async.commit_group"]())
        for kt in range(kts):
            T.evaluate(T.ptx["cp.async.wait_group"](ahead - 1))
            T.tvm_storage_sync("shared")
            T.evaluate(T.ptx.fence.proxy.async_.shared__cta())
            T.evaluate(T.ptx.wgmma.fence.sync.aligned())
            a0: T.let[T.uint32] = base + T.Cast("uint32", (pad + kt % stages * stage
                                                           + tx // 128 * 64 * BK) * 2)
            b0: T.let[T.uint32] = base + T.Cast("uint32", (pad + kt % stages * stage
                                                           + a_elems) * 2)
            for j in T.unroll(BK // 16):
                T.evaluate(_wgmma(bn, dtype, acc, _desc(a0 + T.uint32(32) * j),
                                  _desc(b0 + T.uint32(32) * j), T.Or(kt > 0, j > 0)))
            T.evaluate(T.ptx.wgmma.commit_group.sync.aligned())
            # inflight 1: this k tile's wgmma runs on while the next tiles load; the stage
            # loaded now was read two tiles ago, done in both warpgroups (the barrier above
            # follows each one's wait for the tile before this one)
            T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(inflight))
            if kt + ahead < kts:
                load(x, w, sm, pad, m, m0, n0, tx, (kt + ahead) % stages, kt + ahead)
            T.evaluate(T.ptx["cp.async.commit_group"]())
        T.evaluate(T.ptx.wgmma.wait_group.sync.aligned(0))  # (a no-op without inflight)

    def out_index(m0, n0, tx, i, h, e):
        """(row, col) of accumulator 4i + 2h + e of thread tx (wgmma's m64nNk16 D fragment)."""
        t = tx % 128
        return (m0 + tx // 128 * 64 + t // 32 * 16 + t % 32 // 4 + 8 * h,
                n0 + i * 8 + t % 4 * 2 + e)

    smem = stages * stage + 512

    def out(v, res, row, col):  # the epilogue: cast, the residual added (res is y without one)
        v = T.Cast(out_dtype, v)
        return v + res[row, col] if residual else v

    pitch, vec = _pitch(bn), 16 // (4 if out_dtype == "float32" else 2)

    @T.macro
    def store_direct(acc, res, y, m, m0, n0, tx):
        for i in T.unroll(bn // 8):
            for h in T.unroll(2):
                for e in T.unroll(2):
                    row, col = out_index(m0, n0, tx, i, h, e)
                    if row < m:
                        y[row, col] = out(acc[4 * i + 2 * h + e], res, row, col)

    @T.macro
    def store_staged(sm, acc, res, y, m, m0, n0, tx):
        T.tvm_storage_sync("shared")  # both warpgroups done reading the operand tiles
        so = T.decl_buffer((BM * pitch,), out_dtype, data=sm.data, scope="shared.dyn")
        for i in T.unroll(bn // 8):
            for h in T.unroll(2):
                for e in T.unroll(2):
                    row, col = out_index(0, 0, tx, i, h, e)
                    so[row * pitch + col] = T.Cast(out_dtype, acc[4 * i + 2 * h + e])
        T.tvm_storage_sync("shared")
        for it in T.serial(BM * bn // vec // THREADS):
            q: T.let[T.int32] = tx + THREADS * it
            r: T.let[T.int32] = q // (bn // vec)
            c: T.let[T.int32] = q % (bn // vec) * vec
            if m0 + r < m:
                for v in T.vectorized(vec):
                    y[m0 + r, n0 + c + v] = (so[r * pitch + c + v] + res[m0 + r, n0 + c + v]
                                             if residual else so[r * pitch + c + v])

    @T.macro
    def body(x, w, res, y, m):
        for bx in T.thread_binding((m + BM - 1) // BM * tiles_n, thread="blockIdx.x"):
            for tx in T.thread_binding(THREADS, thread="threadIdx.x"):
                # fp16 storage for bf16 too (2-byte elements: only addressed, never read as
                # values): one module's kernels must agree on the dynamic shared array's type
                sm = T.decl_buffer((smem,), "float16", scope="shared.dyn")
                acc = T.decl_buffer((bn // 2,), f32, scope="local")
                m0: T.let[T.int64] = bx // tiles_n * BM
                n0: T.let[T.int64] = bx % tiles_n * bn
                mainloop(x, w, sm, acc, m, m0, n0, tx)
                if staged:
                    store_staged(sm, acc, res, y, m, m0, n0, tx)
                else:
                    store_direct(acc, res, y, m, m0, n0, tx)

    if residual:
        @T.prim_func(private=True)
        def gemm_res(x_h: T.handle, w: T.Buffer((n, k), dtype), r_h: T.handle, y_h: T.handle):
            T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
            m = T.int64()
            x = T.match_buffer(x_h, (m, k), dtype)
            res = T.match_buffer(r_h, (m, n), out_dtype)
            y = T.match_buffer(y_h, (m, n), out_dtype)
            body(x, w, res, y, m)
        return gemm_res

    @T.prim_func(private=True)
    def gemm(x_h: T.handle, w: T.Buffer((n, k), dtype), y_h: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), dtype)
        y = T.match_buffer(y_h, (m, n), out_dtype)
        body(x, w, y, y, m)
    return gemm
