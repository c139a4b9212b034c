"""Lowering of `sparse_linear` to kiln's CPU expand-load kernels (the "bitmap" layout; AVX-512's
vexpand, or AVX2 + BMI2's permutes on a 256-bit target).

The "nm" (2:4) layout is for sparse tensor cores: it has CUDA kernels only
(kiln.codegen.cuda). Registered into `kiln.codegen.lower.LOWERINGS` on import.
"""

from __future__ import annotations

from tvm import relax

from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.kernels import sparse_linear as sk
from kiln.codegen.lower import LowerContext, _numel, call, dtype_of, lowering, reshape, shape_of
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node


@lowering("sparse_linear")
def _sparse_linear(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, values, meta, scales, b = (ctx.input(node, i) for i in range(5))
    a = node.attrs
    if a.get("layout") != "bitmap":
        raise KilnError(f"node {node.name} (sparse_linear): layout {a.get('layout')!r} has no "
                        f"kernel on target {ctx.target.name} (the CPU takes 'bitmap')")
    if dtype_of(x) != "float32":
        raise KilnError(f"node {node.name} (sparse_linear): activations must be float32, got "
                        f"{dtype_of(x)}")
    vdt = dtype_of(values)
    s = sk.SparseShape(int(a["out_features"]), int(a["in_features"]),
                       int(shape_of(values)[1]), vdt)
    c = ctx.schedule("cpu.sparse_linear", {
        "phase": ctx.phase, "m": ctx.rows, "n": s.n, "k": s.k, "capacity": s.capacity,
        "values": vdt, "bias": b is not None})
    gemm, gemv_nv, chains = plin.PackedConfig(c["mr"], c["nv"]), c["gemv_nv"], c["chains"]
    avx512, prefetch = ctx.target.vector_bits >= 512, c["prefetch"]
    gv = ctx.kernel(("sparse_linear", s.n, s.k, s.capacity, vdt, b is not None, gemm.mr,
                     gemm.nv, gemv_nv, chains, avx512, prefetch),
                    lambda: sk.sparse_linear_kernel(s, gemm, gemv_nv, bias=b is not None,
                                                    avx512=avx512, chains=chains,
                                                    prefetch=prefetch))
    xs = shape_of(x)
    m = _numel(xs[:-1])
    args = [reshape(ctx, x, [m, s.k]), values, meta] + [v for v in (scales, b) if v is not None]
    y = call(ctx, gv, args, [m, s.n], "float32")
    return [reshape(ctx, y, [*xs[:-1], s.n])]
