"""Lowerings of the quantized ops (quant_linear, quant_embedding) to kiln's fused kernels.

Only the `blocked` layout has CPU kernels (pack_linear_weights lays weights out so when compiling
for the CPU); the weight stays quantized in memory and is dequantized inside the kernels.
Registered into `kiln.codegen.lower.LOWERINGS` on import.
"""

from __future__ import annotations

from tvm import relax

from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.kernels import quant_linear as qk
from kiln.codegen.lower import (
    LowerContext,
    _numel,
    call,
    dtype_of,
    lowering,
    reshape,
    shape_of,
)
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node

#: GEMM register tile (prefill) and GEMV panel width (decode, and m <= GEMV_ROWS in prefill)
GEMM = plin.PREFILL
#: by bits. int4: one-block panels (48 of them for N = 768) split evenly over the threads and beat
#: 4-block ones by 18% in SmolLM2's decode (benchmarks/RESULTS.md); the int4 loop is bound by its
#: unpacking, not by FMA latency. int8: the width made no difference
GEMV_NV = {4: 1, 8: 4}


def scheme(node: Node, *, zero_points: bool) -> qk.QuantScheme:
    a = node.attrs
    if a.get("layout") != "blocked":
        raise KilnError(f"node {node.name} ({node.op}): layout {a.get('layout')!r} has no CPU "
                        "kernel (pack_linear_weights(block=16) lays weights out 'blocked')")
    return qk.QuantScheme(int(a["out_features"]), int(a["in_features"]), int(a["bits"]),
                          int(a["group_size"]), zero_points=zero_points)


@lowering("quant_linear")
def _quant_linear(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, qw, sc, zp, b = (ctx.input(node, i) for i in range(5))
    if dtype_of(x) != "float32":
        raise KilnError(f"node {node.name} (quant_linear): activations must be float32, got "
                        f"{dtype_of(x)}")
    s = scheme(node, zero_points=zp is not None)
    gv = ctx.kernel(("qlinear", s.n, s.k, s.bits, s.group, s.zero_points, b is not None,
                     GEMM.mr, GEMM.nv, GEMV_NV[s.bits]),
                    lambda: qk.quant_linear_kernel(s, GEMM, GEMV_NV[s.bits],
                                                    bias=b is not None))
    xs = shape_of(x)
    m = _numel(xs[:-1])
    args = [reshape(ctx, x, [m, s.k]), qw, sc] + [a for a in (zp, b) if a is not None]
    y = call(ctx, gv, args, [m, s.n], "float32")
    return [reshape(ctx, y, [*xs[:-1], s.n])]


@lowering("quant_embedding")
def _quant_embedding(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    qw, sc, zp, ids = (ctx.input(node, i) for i in range(4))
    s = scheme(node, zero_points=zp is not None)
    idt, ids_shape = dtype_of(ids), shape_of(ids)
    gv = ctx.kernel(("qembedding", s.n, s.k, s.bits, s.group, s.zero_points, idt, ctx.par),
                    lambda: qk.quant_embedding_kernel(s, index_dtype=idt, parallel=ctx.par))
    m = _numel(ids_shape)
    args = [qw, sc] + ([zp] if zp is not None else []) + [reshape(ctx, ids, [m])]
    y = call(ctx, gv, args, [m, s.k], "float32")
    return [reshape(ctx, y, [*ids_shape, s.k])]
