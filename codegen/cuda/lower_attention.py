"""CUDA lowering of `attention`: the KV cache written in place, then the attention kernel
(decode: kernels/attention.py; prefill: the tensor-core flash kernel where it applies). Where
the q/k/v Split and the two rotaries feed attention alone (kiln.codegen.cuda.qkv), they become
one kernel with the KV append; in decode the projection joins them
(kernels/gemv.qkv_rope_gemv_kernel, deferred by lower._norm_gemv).

int8 KV cache (kv_bits 8, kiln.passes.quantize_kv_cache): four caches per layer, the int8 K
and V and their float32 scales (kiln.codegen.lower.scale_cache), all updated in place by the
quantizing append (kernels/attention.kv_append_q8_kernel, after the rotary's own kernel: no
fused q/k/v preparation, kiln.codegen.cuda.qkv.fused_groups); the attention kernels read all
four, the prefill the plain tiled kernel (the tensor-core flash kernel takes fp16/bf16 caches
only)."""

from __future__ import annotations

from tvm import relax, tirx
from tvm.relax import op as R

from kiln.codegen.cuda.kernels import attention as attn
from kiln.codegen.cuda.kernels import flash_attention as flash
from kiln.codegen.cuda.kernels import gemv as gemv_k
from kiln.codegen.cuda.kernels import sparse_gemv
from kiln.codegen.cuda.lower import CudaLowerContext, lowering
from kiln.codegen.cuda.qkv import QkvPattern
from kiln.codegen.cuda.spaces import DECODE_PAST, config_key, warp_decode
from kiln.codegen.lower import _numel, _static, dtype_of, reshape, scale_cache, shape_of
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node


@lowering("attention")
def _attention(ctx: CudaLowerContext, node: Node) -> list[relax.Expr | None]:
    """KV append in place, then causal attention; the attention mask is not applied (the
    runtime feeds all ones: no padding on CUDA)."""
    if ctx.input(node, 6) is not None:
        raise KilnError(f"node {node.name} (attention): an additive bias has no CUDA kernel")
    a = node.attrs
    if not a.get("causal", False):
        raise KilnError(f"node {node.name} (attention): only causal attention has a CUDA kernel")
    past_k, past_v = (node.inputs[i] if len(node.inputs) > i else "" for i in (3, 4))
    kv8 = int(a.get("kv_bits", 0)) == 8  # int8 rows + per-row scales
    names = [past_k, past_v] + ([scale_cache(past_k), scale_cache(past_v)] if kv8 else [])
    if any(n not in ctx.caches for n in names):
        raise KilnError(f"node {node.name} (attention): past_k/past_v must be graph inputs "
                        "(they become the in-place KV cache)")
    caches = [ctx.caches[n] for n in names]
    # decode: each row's own cached length (batches of unequal lengths); prefill: past
    pst = ctx.row_lengths() if ctx.phase == "decode" else ctx.past_on_device()
    if node.name in ctx.qkv:  # (never kv8: kiln.codegen.cuda.qkv.fused_groups)
        q, kc2, vc2 = _fused_qkv(ctx, node, ctx.qkv[node.name], *caches, pst)
        return _attend(ctx, node, q, [kc2, vc2], pst, names)
    q, k, v = (ctx.input(node, i) for i in range(3))
    kvh, d, dtype = int(a["num_kv_heads"]), int(a["head_dim"]), dtype_of(q)
    if kv8:
        append = ctx.kernel(("cuda_kv_append_q8", kvh, d, dtype),
                            lambda: attn.kv_append_q8_kernel(kvh, d, dtype))
    else:
        append = ctx.kernel(("cuda_kv_append", kvh, d, dtype),
                            lambda: attn.kv_append_kernel(kvh, d, dtype))
    upd = ctx.bb.emit(R.call_tir_inplace(append, [*caches, k, v, pst], list(range(len(caches))),
                                         [c.ty for c in caches]))
    caches = [ctx.bb.emit(relax.TupleGetItem(upd, i)) for i in range(len(caches))]
    return _attend(ctx, node, q, caches, pst, names)


def _fused_qkv(ctx: CudaLowerContext, node: Node, p: QkvPattern, kc: relax.Expr,
               vc: relax.Expr, pst: relax.Expr) -> tuple[relax.Expr, ...]:
    from kiln.codegen.lower import _split_sizes

    a = node.attrs
    h, kvh, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    if p.split.inputs[0] in ctx.deferred_qkv:
        return _qkv_rope_gemv(ctx, p, h, kvh, d, kc, vc, pst)
    qkv = ctx.values[p.split.inputs[0]]
    xs = shape_of(qkv)
    if _split_sizes(ctx, p.split, _static(xs[-1], "split axis", p.split)) != [h * d, kvh * d,
                                                                          kvh * d]:
        raise KilnError(f"node {p.split.name} (Split): not a q/k/v split of {h}/{kvh} heads")
    dtype = dtype_of(qkv)
    cos, sin = (ctx.values[p.rot_q.inputs[i]] for i in (1, 2))
    if dtype_of(cos) != dtype:
        cos, sin = (ctx.bb.emit(R.astype(t, dtype)) for t in (cos, sin))
    rot, inter = _static(shape_of(cos)[-1], "rotary dim", p.rot_q), bool(
        p.rot_q.attrs.get("interleaved", False))
    gv = ctx.kernel(("cuda_qkv_rotary_append", h, kvh, d, rot, inter, dtype, ctx.pdl),
                    lambda: attn.qkv_rotary_append_kernel(h, kvh, d, rot, inter, dtype,
                                                          pdl=ctx.pdl))
    q_ty = relax.TensorType([*xs[:-1], h * d], dtype)
    upd = ctx.bb.emit(R.call_tir_inplace(gv, [qkv, cos, sin, kc, vc, pst], [3, 4, -1],
                                         [kc.ty, vc.ty, q_ty]))
    kc2, vc2, q = (ctx.bb.emit(relax.TupleGetItem(upd, i)) for i in (0, 1, 2))
    return q, kc2, vc2


def _qkv_rope_gemv(ctx: CudaLowerContext, p: QkvPattern, h: int, kvh: int, d: int,
                   kc: relax.Expr, vc: relax.Expr, pst: relax.Expr) -> tuple[relax.Expr, ...]:
    """Decode: rms norm, q/k/v projection, rotary and KV append in one kernel."""
    x, gamma, w, eps = ctx.deferred_qkv[p.split.inputs[0]]
    xs, dtype = shape_of(x), dtype_of(x)
    cos, sin = (ctx.values[p.rot_q.inputs[i]] for i in (1, 2))
    if dtype_of(cos) != dtype:
        cos, sin = (ctx.bb.emit(R.astype(t, dtype)) for t in (cos, sin))
    m = _numel(xs[:-1])
    sparse = isinstance(w, tuple)  # 2:4 sparse (values, meta): lower_sparse deferred it
    k = (2 * _static(shape_of(w[0])[1], "in features", p.split) if sparse
         else _static(shape_of(w)[1], "in features", p.split))
    c = ctx.schedule("cuda.sparse_gemv_qkv_rope" if sparse else "cuda.gemv_qkv_rope", {
        "phase": "decode", "m": 1, "heads": h, "kv_heads": kvh, "head_dim": d, "k": k,
        "dtype": dtype})
    if sparse:
        gv = ctx.kernel(("cuda_sparse_qkv_rope_gemv", h, kvh, d, k, dtype, eps, ctx.pdl,
                         *config_key(c)),
                        lambda: sparse_gemv.sparse_qkv_rope_gemv_kernel(
                            h, kvh, d, k, dtype, eps, pdl=ctx.pdl, **c))
    else:
        gv = ctx.kernel(("cuda_qkv_rope_gemv", h, kvh, d, k, dtype, eps, ctx.pdl,
                         *config_key(c)),
                        lambda: gemv_k.qkv_rope_gemv_kernel(h, kvh, d, k, dtype, eps,
                                                            pdl=ctx.pdl, **c))
    weights = list(w) if isinstance(w, tuple) else [w]
    at = 4 + len(weights)  # the caches' argument positions (updated in place)
    upd = ctx.bb.emit(R.call_tir_inplace(
        gv, [reshape(ctx, x, [m, k]), gamma, *weights, cos, sin, kc, vc, pst], [at, at + 1, -1],
        [kc.ty, vc.ty, relax.TensorType([m, h * d], dtype)]))
    kc2, vc2, q = (ctx.bb.emit(relax.TupleGetItem(upd, i)) for i in (0, 1, 2))
    return reshape(ctx, q, [*xs[:-1], h * d]), kc2, vc2


def _attend(ctx: CudaLowerContext, node: Node, q: relax.Expr, caches: list[relax.Expr],
            pst: relax.Expr, names: list[str]) -> list:
    """The attention kernel over the updated caches (K, V and with kv8 their scales), which
    then stand for the cache inputs `names` in ctx.caches."""
    a = node.attrs
    h, kvh, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    dtype = dtype_of(q)
    scale = float(a.get("scale", d ** -0.5))
    seq = shape_of(q)[1]
    kv8 = len(caches) == 4
    shape = {"heads": h, "kv_heads": kvh, "head_dim": d, "dtype": dtype}
    window = int(a.get("window") or 0)  # (compile drops those as long as the context)
    if window:  # sliding window: prefill and decode, a plain kernel (not the hot path)
        c = {}
        gv = ctx.kernel(("cuda_window_attention", h, kvh, d, scale, dtype, window)
                        + (("kv8",) if kv8 else ()),
                        lambda: attn.window_attention_kernel(h, kvh, d, scale, dtype, window,
                                                             kv8=kv8))
    elif isinstance(seq, tirx.IntImm) and seq.value == 1:
        warps = attn.WARP_DECODE
        c = ctx.schedule("cuda.decode_attention", {
            **shape, "phase": "decode", "s": 1, "past": ctx.decode_past or DECODE_PAST,
            **({"kv8": True} if kv8 else {})}) if warp_decode(d) else {}
        gv = ctx.kernel(("cuda_decode_attention", h, kvh, d, scale, dtype, ctx.pdl, warps,
                         *config_key(c)) + (("kv8",) if kv8 else ()),
                        lambda: attn.decode_attention_kernel(h, kvh, d, scale, dtype,
                                                             pdl=ctx.pdl, warps=warps, kv8=kv8,
                                                             **c))
    elif not kv8 and flash.supported(d, dtype):  # tensor cores
        ldsm = flash.LDSM
        c = ctx.schedule("cuda.flash_prefill", {**shape, "phase": "prefill", "s": ctx.rows,
                                                "past": 0, "ldsm": ldsm})
        gv = ctx.kernel(("cuda_flash_prefill", h, kvh, d, scale, dtype, *config_key(c))
                        + (("ldsm",) if ldsm else ()),
                        lambda: flash.flash_prefill_kernel(h, kvh, d, scale, dtype, ldsm=ldsm,
                                                           **c))
    else:
        c = {}
        gv = ctx.kernel(("cuda_prefill_attention", h, kvh, d, scale, dtype)
                        + (("kv8",) if kv8 else ()),
                        lambda: attn.prefill_attention_kernel(h, kvh, d, scale, dtype, kv8=kv8))
    out_ty = relax.TensorType(shape_of(q), dtype)
    if "splits" in c:  # the warp decode kernel: its splits' states go through a scratch
        b, s = shape_of(q)[:2]
        part_ty = relax.TensorType([b, s, h, attn.MAX_SPLITS, d + 2], "float32")
        both = ctx.bb.emit(R.call_tir(gv, [q, *caches, pst], [part_ty, out_ty]))
        out = ctx.bb.emit(relax.TupleGetItem(both, 1))
    else:
        out = ctx.bb.emit(R.call_tir(gv, [q, *caches, pst], out_ty))
    ctx.caches.update(zip(names, caches, strict=True))
    return [out, caches[0], caches[1]]
