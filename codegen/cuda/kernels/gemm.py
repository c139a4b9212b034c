"""Prefill GEMM for CUDA: y[m, n] = epilogue(x[m, k] . w[n, k]) on the tensor cores (WMMA
16x16x16, fp16/bf16 in, fp32 accumulation), with a tile shape the schedule space cuda.gemm tunes.

The untuned fp16 GEMM is the TE NT-matmul that the CUDA pipeline fuses with its epilogue and
dlight's `Matmul` rule schedules: 128x128 block tiles, k tiles of 64, 16 warps of 32x32 (DLIGHT
below). dlight tensorizes float16 only (a bf16 matmul would run on the CUDA cores), so bf16
GEMMs always take `gemm_kernel`, whose DLIGHT tile is the same schedule on bf16 WMMA.
`gemm_kernel` builds the same computation, epilogue included, scheduled here for any tile:
a block computes a bm x bn tile of y from k tiles of bk staged in shared memory, each of its
wm x wn warps a (bm / wm) x (bn / wn) sub-tile in WMMA accumulator fragments; the tile is
written back through shared memory, where the epilogue (bias, cast, residual add) is applied.
Rows are padded to whole tiles (m is the prompt length, known at run time only).
"""

from __future__ import annotations

import functools

from tvm import s_tir, te, tirx

#: dlight's fp16 tensor-core tiling (s_tir/dlight/gpu/matmul.py, MatmulTensorization)
DLIGHT = {"bm": 128, "bn": 128, "bk": 64, "wm": 4, "wn": 4, "stages": 1}
SHARED_LIMIT = 227 * 1024


def tile_ok(n: int, k: int, c: dict) -> bool:
    """Whether tile config `c` divides the static dims and fits one block: warps holding whole
    16x16 fragments, at most 1024 threads, `stages` A/B tiles and the fp32 output tile in
    227 KB."""
    bm, bn, bk, wm, wn = (c[x] for x in ("bm", "bn", "bk", "wm", "wn"))
    frags = bm % (16 * wm) == 0 and bn % (16 * wn) == 0 and bk % 16 == 0
    shared = (bm + bn) * (bk + 8) * 2 * c.get("stages", 1) + bm * (bn + 4) * 4
    fetch = bm * bk % (wm * wn * 32 * 8) == 0 and bn * bk % (wm * wn * 32 * 8) == 0
    return (frags and fetch and n % bn == 0 and k % bk == 0 and wm * wn * 32 <= 1024
            and shared <= SHARED_LIMIT)


def gemm_func(n: int, k: int, dtype: str, out_dtype: str, *, bias: bool = False,
              residual: bool = False) -> tirx.PrimFunc:
    """The unscheduled PrimFunc(x[m, k], w[n, k], (bias[n],) (res[m, n],) y[m, n])."""
    acc = "float32"
    m = tirx.Var("m", "int64")
    n, k = tirx.const(n, "int64"), tirx.const(k, "int64")  # one index type throughout
    x = te.placeholder((m, k), dtype, name="x")
    w = te.placeholder((n, k), dtype, name="w")
    b = te.placeholder((n,), dtype, name="bias") if bias else None
    r = te.placeholder((m, n), out_dtype, name="res") if residual else None
    kk = te.reduce_axis((tirx.const(0, "int64"), k), name="k")
    mm = te.compute((m, n), lambda i, j: te.sum(x[i, kk].astype(acc) * w[j, kk].astype(acc),
                                                axis=kk), name="matmul")

    def epilogue(i, j):
        v = mm[i, j] + b[j].astype(acc) if bias else mm[i, j]
        v = v.astype(out_dtype)
        return v + r[i, j] if residual else v

    y = te.compute((m, n), epilogue, name="epilogue")
    args = [x, w] + ([b] if bias else []) + ([r] if residual else []) + [y]
    return te.create_prim_func(args)


@functools.cache
def gemm_kernel(n: int, k: int, dtype: str, out_dtype: str, *, bias: bool = False,
                residual: bool = False, bm: int = 128, bn: int = 128, bk: int = 64,
                wm: int = 4, wn: int = 4, stages: int = 1) -> tirx.PrimFunc:
    """gemm_func scheduled for the tensor cores with the given tile (see tile_ok); `stages` 2
    or 3: the next 1 or 2 k tiles are copied to shared memory (cp.async) while this one is
    multiplied."""
    c = {"bm": bm, "bn": bn, "bk": bk, "wm": wm, "wn": wn, "stages": stages}
    if not tile_ok(n, k, c):
        raise ValueError(f"gemm_kernel: tile {c} does not fit n = {n}, k = {k}")
    sch = s_tir.Schedule(gemm_func(n, k, dtype, out_dtype, bias=bias, residual=residual))
    _schedule(sch, dtype, c)
    return _finish(sch.mod["main"])


def dlight_kernel(n: int, k: int, dtype: str, out_dtype: str, *, bias: bool = False,
                  residual: bool = False, target=None) -> tirx.PrimFunc:
    """gemm_func scheduled by dlight's Matmul rule, as the CUDA pipeline schedules the untuned
    GEMM (for measuring it beside gemm_kernel's tiles); `target` a tvm Target (sm_90)."""
    import tvm
    from tvm.s_tir import dlight

    from kiln.codegen.cuda_toolchain import cheap_frame_stacks, dlight_reads_arch_suffixes

    dlight_reads_arch_suffixes()  # (sm_90a: tensor cores too)
    target = target or tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    func = gemm_func(n, k, dtype, out_dtype, bias=bias, residual=residual)
    with cheap_frame_stacks(), target:
        sch = dlight.gpu.Matmul().apply(func, target, False)
    return _finish(sch.mod["main"])


def _schedule(sch: s_tir.Schedule, dtype: str, c: dict) -> None:

    intrin = _wmma_intrinsics(dtype)
    warps = c["wm"] * c["wn"]
    mm = sch.get_sblock("matmul")
    sch.pad_einsum(mm, [c["bm"], c["bn"], c["bk"]])
    # 16x16x16 steps as an inner block (what WMMA computes), tiles around them
    i, j, k = sch.get_loops(mm)
    i, i16 = sch.split(i, [None, 16])
    j, j16 = sch.split(j, [None, 16])
    k, k16 = sch.split(k, [None, 16])
    sch.reorder(i, j, k, i16, j16, k16)
    outer = sch.blockize(i16)
    bi, wi, fi = sch.split(i, [None, c["wm"], c["bm"] // 16 // c["wm"]])
    bj, wj, fj = sch.split(j, [None, c["wn"], c["bn"] // 16 // c["wn"]])
    ko, ki = sch.split(k, [None, c["bk"] // 16])
    sch.reorder(bi, bj, wi, wj, ko, ki, fi, fj)
    sch.bind(bi, "blockIdx.y")
    sch.bind(bj, "blockIdx.x")
    warp = sch.fuse(wi, wj)
    sch.bind(warp, "threadIdx.y")

    # k tiles of x and w in shared memory, fetched by every thread in 16-byte vectors
    for idx in (0, 1):
        tile = sch.cache_read(outer, idx, "shared.dyn")
        sch.compute_at(tile, ko)
        fused = sch.fuse(*sch.get_loops(tile)[-2:])
        _, ty, tx, vec = sch.split(fused, [None, warps, 32, 8])
        sch.bind(ty, "threadIdx.y")
        sch.bind(tx, "threadIdx.x")
        sch.vectorize(vec)
        sch.storage_align(tile, 0, axis=-2, factor=32, offset=8)
        for pad in sch.get_producers(tile):  # the zero-padding of rows beyond m
            sch.compute_inline(pad)
    # operand fragments per 16-wide k step
    for idx, scope, load in ((0, "wmma.matrix_a", "load_a"), (1, "wmma.matrix_b", "load_b")):
        frag = sch.cache_read(outer, idx, scope)
        sch.compute_at(frag, ki)
        rows, cols = sch.get_loops(frag)[-2:]
        r0, r1 = sch.split(rows, [None, 16])
        c0, c1 = sch.split(cols, [None, 16])
        sch.reorder(r0, c0, r1, c1)
        sch.tensorize(r1, intrin[load])
    # accumulators -> shared (per warp) -> global, with the epilogue
    out_tile = sch.cache_write(outer, 0, "shared.dyn")
    acc = sch.cache_write(outer, 0, "wmma.accumulator")
    sch.reverse_compute_at(acc, warp)
    rows, cols = sch.get_loops(acc)[-2:]
    r0, r1 = sch.split(rows, [None, 16])
    c0, c1 = sch.split(cols, [None, 16])
    sch.reorder(r0, c0, r1, c1)
    sch.tensorize(r1, intrin["store"])
    chain = _consumer_chain(sch, out_tile)  # un-padding, epilogue
    for block in [out_tile, *chain[:-1]]:
        sch.compute_inline(block)
    last = chain[-1]
    sch.reverse_compute_at(last, warp)
    fused = sch.fuse(*sch.get_loops(last)[-2:])
    _, tx = sch.split(fused, [None, 32])
    sch.bind(tx, "threadIdx.x")
    # the reduction: zero the accumulators, then WMMA steps
    init = sch.decompose_reduction(outer, ko)
    sch.tensorize(sch.get_loops(sch.get_child_blocks(init)[0])[-2], intrin["init"])
    sch.tensorize(sch.get_loops(sch.get_sblock("matmul"))[-3], intrin["compute"])
    if c["stages"] > 1:  # under ko: the x fetch, the w fetch, the k steps
        sch.annotate(ko, "software_pipeline_stage", [0, 0, c["stages"] - 1])
        sch.annotate(ko, "software_pipeline_order", [0, 1, 2])
        sch.annotate(ko, "software_pipeline_async_stages", [0])


@functools.cache
def _wmma_intrinsics(dtype: str) -> dict[str, str]:
    """The names of the WMMA tensor intrinsics (16x16x16, operands from dynamic shared memory,
    w transposed, float32 accumulators) for `dtype`: TVM's own for float16; for bfloat16,
    which TVM registers none of, the same definitions instantiated here under kiln names
    (`wmma::fragment<..., __nv_bfloat16, ...>`, sm_80 and later)."""
    from kiln.codegen.cuda_toolchain import cheap_frame_stacks

    with cheap_frame_stacks():  # the first import parses ~500 TVMScript intrinsics
        from tvm.s_tir import TensorIntrin
        from tvm.s_tir.tensor_intrin import cuda as tc

    group = tc.get_wmma_intrin_group("shared.dyn", "shared.dyn", "float16", "float32", True)
    if dtype == "float16":
        return group
    if dtype != "bfloat16":
        raise ValueError(f"no WMMA GEMM for {dtype}")
    names = {"load_a": "kiln_wmma_load_16x16x16_bf16_a_shared_dyn",
             "load_b": "kiln_wmma_load_16x16x16_bf16_b_trans_shared_dyn",
             "compute": "kiln_wmma_sync_16x16x16_bf16bf16f32_trans"}
    with cheap_frame_stacks():
        TensorIntrin.register(names["load_a"], *tc.get_wmma_load_intrin(
            16, 16, 16, dtype, "shared.dyn", False, False), override=True)
        TensorIntrin.register(names["load_b"], *tc.get_wmma_load_intrin(
            16, 16, 16, dtype, "shared.dyn", True, True), override=True)
        TensorIntrin.register(names["compute"], *tc.get_wmma_sync_intrin(
            16, 16, 16, dtype, "float32", True), override=True)
    return {**group, **names}  # the float32 fill and store are dtype-free


def _finish(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """Scheduled (dlight leaves it alone), no aliasing, and private like kiln's other kernels
    (the module names it)."""
    return func.with_attr("tirx.is_scheduled", True).with_attr(
        "tirx.noalias", True).without_attr("global_symbol")


def _consumer_chain(sch: s_tir.Schedule, block) -> list:
    """The blocks reading `block`'s output one after another (un-padding, epilogue)."""
    chain, cur = [], block
    while True:
        users = sch.get_consumers(cur)
        if len(users) != 1:
            return chain
        chain.append(users[0])
        cur = users[0]
