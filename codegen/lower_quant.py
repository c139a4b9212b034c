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


def scheme(node: Node, *, zero_points: bool) -> qk.QuantScheme:
    a = node.attrs
    if a.get("layout") != "blocked":
        raise KilnError(f"node {node.name} ({node.op}): layout {a.get('layout')!r} has no CPU "
                        "kernel (pack_linear_weights(block=16) lays weights out 'blocked')")
    return qk.QuantScheme(int(a["out_features"]), int(a["in_features"]), int(a["bits"]),
                          int(a["group_size"]), zero_points=zero_points,
                          act_bits=int(a.get("act_bits", 0)))


@lowering("quant_linear")
def _quant_linear(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, qw, sc, zp, b = (ctx.input(node, i) for i in range(5))
    if dtype_of(x) != "float32":
        raise KilnError(f"node {node.name} (quant_linear): activations must be float32, got "
                        f"{dtype_of(x)}")
    s = scheme(node, zero_points=zp is not None)
    act = {"act": s.act_bits} if s.act_bits else {}  # (absent: the buckets tuned before -a8)
    c = ctx.schedule("cpu.quant_linear", {
        "phase": ctx.phase, "m": ctx.rows, "n": s.n, "k": s.k, "bits": s.bits,
        "group": s.group, "zp": s.zero_points, "bias": b is not None, **act})
    gemm, gemv_nv = plin.PackedConfig(c["mr"], c["nv"]), c["gemv_nv"]
    vnni = getattr(ctx.target, "vnni", False)
    gv = ctx.kernel(("qlinear", s.n, s.k, s.bits, s.group, s.zero_points, b is not None,
                     gemm.mr, gemm.nv, gemv_nv, s.act_bits, vnni),
                    lambda: qk.quant_linear_kernel(s, gemm, gemv_nv, bias=b is not None,
                                                   vnni=vnni))
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
    par = ctx.par("qembedding", s.k)
    gv = ctx.kernel(("qembedding", s.n, s.k, s.bits, s.group, s.zero_points, idt, par),
                    lambda: qk.quant_embedding_kernel(s, index_dtype=idt, parallel=par))
    m = _numel(ids_shape)
    args = [qw, sc] + ([zp] if zp is not None else []) + [reshape(ctx, ids, [m])]
    y = call(ctx, gv, args, [m, s.k], "float32")
    return [reshape(ctx, y, [*ids_shape, s.k])]
