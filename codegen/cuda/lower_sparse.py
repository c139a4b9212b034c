"""CUDA lowering of `sparse_linear` in the 2:4 `nm` layout (kiln.runtime.sparse_format).

Decode (one token per row, fp16/bf16 values): the sparse GEMVs of
kernels/sparse_gemv.py, which read the compressed values and the metadata (1.125 bytes per
weight), with the dense decode path's fusions: the rms_norm in front, the residual Add behind,
the SwiGLU of a gate/up projection, and the q/k/v projection + rotary + KV append (deferred to
lower_attention as the dense one is). Prefill: the weight decompressed into a dense scratch
weight by a 16-byte kernel (sparse_gemv.nm_decompress_kernel), then the dense tensor-core GEMM;
PREFILL = "fused" (the benchmarks' A/B) inlines the 2:4 decode into the GEMM's weight-tile
fetch instead (te_ops.sparse_nt_matmul: decompressed in shared memory, no scratch weight),
which dlight schedules as scalar gathers: 0.64x dense at 2048 tokens on the H200 against the
scratch weight's 0.93x (0.82x with te_ops.nm_decode's generic schedule; benchmarks/gpu/
cuda_llm_log.md runs 16-17). Neither reaches the dense GEMM: the zeros are still multiplied
(no sparse tensor cores, `mma.sp`, here).
Other dtypes (float32) take the prefill path for decode too.
"""

from __future__ import annotations

from tvm import relax
from tvm.relax import op as R

from kiln.codegen.cuda.kernels import sparse_gemv as sg
from kiln.codegen.cuda.kernels import te_ops
from kiln.codegen.cuda.lower import (
    CudaLowerContext,
    _decode_shaped,
    _gemm_epilogue,
    _residual,
    _rope_fusable,
    _swiglu,
    _swiglu_halves,
    _te,
    lowering,
)
from kiln.codegen.cuda.spaces import config_key
from kiln.codegen.lower import _numel, dtype_of, reshape, shape_of
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node

#: prefill GEMM: "scratch" (decompress kernel, plain GEMM) or "fused" (decode in the tile fetch)
PREFILL = "scratch"


@lowering("sparse_linear")
def _sparse_linear(ctx: CudaLowerContext, node: Node) -> list[relax.Expr | None]:
    a = node.attrs
    if a.get("layout") != "nm":
        raise KilnError(f"node {node.name} (sparse_linear): layout {a.get('layout')!r} is for "
                        "the CPU kernels; CUDA reads the 2:4 `nm` layout")
    if ctx.input(node, 3) is not None:
        raise KilnError(f"node {node.name} (sparse_linear): int8 sparse values have no CUDA "
                        "kernel (2:4 values in the compute dtype only)")
    n, k = int(a["out_features"]), int(a["in_features"])
    values, meta, b = ctx.input(node, 1), ctx.input(node, 2), ctx.input(node, 4)
    deferred = ctx.deferred.get(node.inputs[0])
    x = deferred[0] if deferred else ctx.input(node, 0)
    xs, dtype = shape_of(x), dtype_of(x)
    out_dtype = "float32" if node.outputs[0] in ctx.graph.outputs else dtype
    if _decode_shaped(x) and sg.supported(k, dtype) and dtype_of(values) == dtype:
        return [_decode(ctx, node, x, values, meta, b, deferred, n, k, out_dtype)]
    if deferred:
        raise KilnError(f"node {node.name} (sparse_linear): a fused norm needs the decode GEMV")
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    x2 = reshape(ctx, x, [_numel(xs[:-1]), k])
    if PREFILL == "scratch" and k % sg.CHUNK == 0 and dtype_of(values) in ("float16",
                                                                         "bfloat16"):
        gv = ctx.kernel(("cuda_nm_decompress", n, k, dtype_of(values)),
                        lambda: sg.nm_decompress_kernel(n, k, dtype_of(values)))
        w = ctx.bb.emit(R.call_tir(gv, [values, meta], relax.TensorType([n, k], dtype_of(
            values))))
        y = _te(ctx, te_ops.nt_matmul, x2, w, acc)
    elif PREFILL == "scratch":
        y = _te(ctx, te_ops.nt_matmul, x2, _te(ctx, te_ops.nm_decode, values, meta, k=k), acc)
    else:
        y = _te(ctx, te_ops.sparse_nt_matmul, x2, values, meta, k=k, out_dtype=acc)
    return [_gemm_epilogue(ctx, node, y, b, xs, n, acc, out_dtype)]


def _decode(ctx: CudaLowerContext, node: Node, x: relax.Expr, values: relax.Expr,
            meta: relax.Expr, b: relax.Expr | None, deferred: tuple | None, n: int, k: int,
            out_dtype: str) -> relax.Expr | None:
    """The decode GEMV: with the norm deferred into it (SwiGLU or q/k/v-rotary epilogue where
    the graph has them), or with the residual Add behind; a bias (never with a deferred norm:
    lower.CudaLowerContext defers none into a biased linear) is added after the GEMV."""
    xs, dtype, pdl = shape_of(x), dtype_of(x), ctx.pdl
    m = _numel(xs[:-1])
    x2 = reshape(ctx, x, [m, k])
    if deferred:
        gamma, eps = deferred[1], deferred[2]
        gate_up = _swiglu_halves(ctx, node, n)
        if gate_up is not None:
            (sp, u), f = gate_up, n // 2
            c = ctx.schedule("cuda.sparse_gemv_swiglu", {"phase": "decode", "m": 1, "f": f,
                                                          "k": k, "dtype": dtype})
            gv = ctx.kernel(("cuda_sparse_swiglu_gemv", f, k, dtype, eps, pdl, *config_key(c)),
                            lambda: sg.sparse_swiglu_gemv_kernel(f, k, dtype, eps, pdl=pdl,
                                                                 **c))
            y = ctx.bb.emit(R.call_tir(gv, [x2, gamma, values, meta],
                                       relax.TensorType([m, f], dtype)))
            ctx.values[u.outputs[0]] = reshape(ctx, y, [*xs[:-1], f])
            ctx.done.update((sp.name, u.name))
            return None
        if _rope_fusable(ctx, node, dtype, n):  # lower_attention emits the kernel
            ctx.deferred_qkv[node.outputs[0]] = (x, gamma, (values, meta), eps)
            return None
        c = ctx.schedule("cuda.sparse_gemv", {"phase": "decode", "m": 1, "n": n, "k": k,
                                              "dtype": dtype, "out_dtype": out_dtype,
                                              "epilogue": "norm"})
        gv = ctx.kernel(("cuda_sparse_norm_gemv", n, k, dtype, out_dtype, eps, pdl,
                         *config_key(c)),
                        lambda: sg.sparse_gemv_kernel(n, k, dtype, out_dtype, norm_eps=eps,
                                                      pdl=pdl, **c))
        y = ctx.bb.emit(R.call_tir(gv, [x2, gamma, values, meta],
                                   relax.TensorType([m, n], out_dtype)))
        return reshape(ctx, y, [*xs[:-1], n])
    add, other = _residual(ctx, node, out_dtype) if b is None else (None, None)
    args = [x2, values, meta] + ([reshape(ctx, other, [m, n])] if other is not None else [])
    c = ctx.schedule("cuda.sparse_gemv", {
        "phase": "decode", "m": 1, "n": n, "k": k, "dtype": dtype, "out_dtype": out_dtype,
        "epilogue": "residual" if other is not None else ""})
    gv = ctx.kernel(("cuda_sparse_gemv", n, k, dtype, out_dtype, other is not None, pdl,
                     *config_key(c)),
                    lambda: sg.sparse_gemv_kernel(n, k, dtype, out_dtype,
                                                  residual=other is not None, pdl=pdl, **c))
    y2 = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, n], out_dtype)))
    if b is not None:
        y2 = ctx.bb.emit(R.add(y2, R.astype(b, out_dtype) if dtype_of(b) != out_dtype else b))
    _swiglu(ctx, node, y2, xs, n)
    y = reshape(ctx, y2, [*xs[:-1], n])
    if other is not None:  # the Add's output is this GEMV's
        ctx.values[add.outputs[0]] = y
        ctx.done.add(add.name)
    return y
