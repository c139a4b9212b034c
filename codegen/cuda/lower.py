"""The CUDA lowering table: canonical kiln IR op -> Relax (TE ops that the CUDA pipeline fuses
and dlight schedules; hand-scheduled TIR for attention, the KV cache, the decode GEMVs, the
quantized decode GEMV and the prefill's row kernels).

Prefill GEMMs are TE NT-matmuls scheduled by dlight (tensor cores for fp16), with bias, cast and
the residual Add as their fused epilogue and, for `quant_linear`, the dequantize as their fused
prologue; decode linears are GEMVs with the rms_norm in front / residual behind fused. Which ops
fuse is read from the fusion groups the fusion passes recorded (kiln.passes.fusion), never
matched here; an op outside a group, or whose fused kernel does not apply, lowers alone.

Same contract as kiln.codegen.lower (a lowering returns one Relax expression per node output),
its own table: CUDA_LOWERINGS. Compute dtype is the parameters' (cast at build time); matmuls
and reductions accumulate in float32; the logits (graph outputs) stay float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tvm import relax, tirx
from tvm.relax import op as R

from kiln.codegen.cuda import spaces  # (registers the cuda.* schedule spaces)
from kiln.codegen.cuda.kernels import attention as attn
from kiln.codegen.cuda.kernels import gemm as gemm_k
from kiln.codegen.cuda.kernels import gemv as gemv_k
from kiln.codegen.cuda.kernels import pdl, rowwise, sparse_gemv, te_ops
from kiln.codegen.cuda.kernels import quant_gemv as qgemv
from kiln.codegen.cuda.kernels import wgmma_gemm as wgmma_k
from kiln.codegen.cuda.qkv import QkvPattern, fused_groups
from kiln.codegen.cuda.spaces import config_key
from kiln.codegen.lower import (
    LowerContext,
    _numel,
    _static,
    dtype_of,
    lowered,
    reshape,
    shape_of,
)
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Node
from kiln.passes.fusion import recorded

Lowering = Callable[["CudaLowerContext", Node], Sequence[relax.Expr | None]]
CUDA_LOWERINGS: dict[str, Lowering] = {}


def _gemv_ok(node: Node, dtype: str) -> bool:
    """Whether the decode GEMV of this linear exists (quantized: a supported scheme; sparse:
    2:4 fp16/bf16 values, kernels/sparse_gemv.py), computing in `dtype`."""
    a = node.attrs
    if node.op == "sparse_linear":
        scales = node.inputs[3] if len(node.inputs) > 3 else ""
        return a.get("layout") == "nm" and not scales and sparse_gemv.supported(
            int(a["in_features"]), dtype)
    if node.op != "quant_linear":
        return True
    return a.get("layout") == "nk" and qgemv.supported(int(a["bits"]), int(a["group_size"]),
                                                        int(a["in_features"]))


@dataclass
class CudaLowerContext(LowerContext):
    """LowerContext plus the device tensor holding `past` (made once per entry point) and the
    attention nodes whose q/k/v preparation is fused."""

    past_tensor: relax.Expr | None = None
    lengths_tensor: relax.Expr | None = None
    qkv: dict[str, QkvPattern] | None = None

    def __post_init__(self) -> None:
        """Read the fusion groups the fusion passes recorded (kiln.passes.fusion); a fusion
        without groups (not run, --no-fuse) leaves every op of it to its unfused lowering."""
        g = self.graph
        qkv_groups = fused_groups(g)
        self.qkv = {a.name: QkvPattern(sp, rq, rk) for sp, rq, rk, a in qkv_groups}
        self.fused_away = {n.name for p in self.qkv.values()
                           for n in (p.split, p.rot_q, p.rot_k)}
        self.done: set[str] = set()  # nodes already lowered as part of another
        # linear -> the residual Add that alone consumes it (fused into the decode GEMV)
        self.residual_adds = {lin.name: add for lin, add in recorded(g, "residual_add")}
        # rms_norm outputs read by one bias-free linear alone: in decode, the norm is fused
        # into that linear's GEMV where it has one (deferred: output name -> (x, gamma, eps))
        self.norm_into = {norm.outputs[0] for norm, lin in recorded(g, "norm_linear")
                          if _gemv_ok(lin, self.target.dtype)}
        self.deferred: dict[str, tuple] = {}
        # q/k/v projection output -> its attention node: in decode, that projection, the
        # rotary and the KV append are one kernel (deferred: output -> (x, gamma, w, eps))
        attention_of = {sp.name: a for sp, _, _, a in qkv_groups}
        self.qkv_of = {lin.outputs[0]: attention_of[sp.name]
                       for lin, sp in recorded(g, "qkv_projection") if sp.name in attention_of}
        self.deferred_qkv: dict[str, tuple] = {}
        # linear -> (Split, silu_mul) it alone feeds as gate/up: SwiGLU fused into the GEMV
        self.swiglu = {lin.name: (sp, u) for lin, sp, u in recorded(g, "swiglu")}

    @property
    def pdl(self) -> bool:
        """Whether the decode kernels use programmatic dependent launch (kernels/pdl.py)."""
        return pdl.supported(self.target.arch)

    def past_on_device(self) -> relax.Expr:
        if self.past_tensor is None:
            gv = self.kernel(("kv_past",), attn.past_kernel)
            self.past_tensor = self.bb.emit(R.call_tir(
                gv, [relax.prim_value(self.past)], relax.TensorType([1], "int32")))
        return self.past_tensor

    def row_lengths(self) -> relax.Expr:
        """(batch,) int32 on the device: past + each row's offset (entry-point scalars, like
        past: computed outside the captured graph), the cached length of every batch row. Decode
        kernels read these (rows of unequal lengths); prefill runs equal rows (offsets 0)."""
        if self.lengths_tensor is None:
            from kiln.codegen.build import ROW_OFFSET

            offsets = [v for k, v in self.symbols.items() if k.startswith(ROW_OFFSET)]
            offsets.sort(key=lambda v: int(v.name[len(ROW_OFFSET):]))
            key = ("cuda_row_lengths", len(offsets))
            if key not in self.kernels:  # a TE function: its root block is there already
                self.kernels[key] = self.bb.add_func(attn.row_lengths_kernel(len(offsets)),
                                                     "cuda_row_lengths")
            gv = self.kernels[key]
            self.lengths_tensor = self.bb.emit(R.call_tir(
                gv, [relax.prim_value(v) for v in (self.past, *offsets)],
                relax.TensorType([self.symbols["batch"]], "int32")))
        return self.lengths_tensor


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            CUDA_LOWERINGS[op] = fn
        return fn

    return register


def lower_node(ctx: CudaLowerContext, node: Node) -> None:
    """Emit `node` into ctx.bb and bind its outputs in ctx.values."""
    fn = CUDA_LOWERINGS.get(node.op)
    if fn is None:
        raise KilnError(f"no lowering for op {node.op} (node {node.name}) on target "
                        f"{ctx.target.name}")
    ctx.past_on_device()  # first of all: the kernels after it form one CUDA graph
    if ctx.phase == "decode":
        ctx.row_lengths()  # (also outside the graph: it reads the entry's scalars)
    if node.name in ctx.fused_away or node.name in ctx.done:  # lowered with another node
        return
    for name, expr in zip(node.outputs, lowered(fn, ctx, node), strict=False):
        if name and expr is not None:
            if name in ctx.graph.outputs and dtype_of(expr) in ("float16", "bfloat16"):
                expr = ctx.bb.emit(R.astype(expr, "float32"))  # logits after a softcap ...
            ctx.values[name] = expr


def last_position(ctx: CudaLowerContext, x: relax.Expr) -> relax.Expr:
    return ctx.bb.emit_te(te_ops.last_position, x)


def _te(ctx: CudaLowerContext, fn, *args, **kw) -> relax.Expr:
    return ctx.bb.emit_te(fn, *args, **kw)


@lowering("linear")
def _linear(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    if node.inputs[0] in ctx.deferred:  # decode: rms_norm + GEMV in one kernel
        return [_norm_gemv(ctx, node, *ctx.deferred[node.inputs[0]])]
    x, w, b = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    if node.attrs.get("packed"):
        raise KilnError(f"node {node.name} (linear): packed weights are for the CPU kernels")
    xs, (n, k) = shape_of(x), shape_of(w)
    n, k, dtype = _static(n, "out features", node), _static(k, "in features", node), dtype_of(x)
    if b is None and len(xs) == 3 and isinstance(xs[1], tirx.IntImm) and xs[1].value == 1:
        return [_gemv(ctx, node, x, w, n, k)]
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    out_dtype = acc if node.outputs[0] in ctx.graph.outputs else dtype  # logits stay fp32
    if ctx.phase == "prefill" and dtype in ("float16", "bfloat16"):  # tensor cores: tunable
        c = ctx.schedule("cuda.gemm", {
            "phase": ctx.phase, "m": ctx.rows, "n": n, "k": k, "dtype": dtype,
            "out_dtype": out_dtype, "bias": b is not None,
            "residual": _residual(ctx, node, out_dtype)[1] is not None})
        if not spaces.takes_dlight(c, n, k, dtype):
            return [_tiled_gemm(ctx, node, x, w, b, n, k, out_dtype, c)]
    y = _te(ctx, te_ops.nt_matmul, reshape(ctx, x, [_numel(xs[:-1]), k]), w, acc)
    return [_gemm_epilogue(ctx, node, y, b, xs, n, acc, out_dtype)]


def _tiled_gemm(ctx: CudaLowerContext, node: Node, x: relax.Expr, w: relax.Expr,
                b: relax.Expr | None, n: int, k: int, out_dtype: str, c: dict) -> relax.Expr:
    """A tuned tile (kernels/gemm.py) or a wgmma kernel (kernels/wgmma_gemm.py, mma "wgmma")
    instead of dlight's: the GEMM and its epilogue (bias, cast, the residual Add consuming it)
    as one kernel of kiln's own schedule."""
    xs, dtype = shape_of(x), dtype_of(x)
    m = _numel(xs[:-1])
    add, other = _residual(ctx, node, out_dtype)
    if c["mma"] == "wgmma":  # (bias-free: the space's valid)
        args = [reshape(ctx, x, [m, k]), w] + ([] if other is None else
                                               [reshape(ctx, other, [m, n])])
        gv = ctx.kernel(("cuda_wgmma_gemm", n, k, dtype, out_dtype, other is not None,
                         *config_key(c)),
                        lambda: wgmma_k.wgmma_gemm_kernel(n, k, dtype, out_dtype,
                                                          residual=other is not None,
                                                          bn=c["bn"], stages=c["stages"],
                                                          inflight=c["inflight"],
                                                          staged=c["staged"]))
        y = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, n], out_dtype)))
        return _finish(ctx, node, y, xs, n, add)
    args = [reshape(ctx, x, [m, k]), w]
    args += [] if b is None else [b if dtype_of(b) == dtype else ctx.bb.emit(R.astype(b, dtype))]
    args += [] if other is None else [reshape(ctx, other, [m, n])]
    gv = ctx.kernel(("cuda_gemm", n, k, dtype, out_dtype, b is not None, other is not None,
                     *config_key(c)),
                    lambda: gemm_k.gemm_kernel(n, k, dtype, out_dtype, bias=b is not None,
                                               residual=other is not None, **spaces.tile(c)))
    y = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, n], out_dtype)))
    return _finish(ctx, node, y, xs, n, add)


def _gemv(ctx: CudaLowerContext, node: Node, x: relax.Expr, w: relax.Expr, n: int,
          k: int) -> relax.Expr:
    """One token per row (decode): the weight-streaming GEMV, with the residual Add that
    consumes the output fused in when its other operand is ready."""
    xs, dtype = shape_of(x), dtype_of(x)
    out_dtype = "float32" if node.outputs[0] in ctx.graph.outputs else dtype
    m = _numel(xs[:-1])
    add, other = _residual(ctx, node, out_dtype)
    args = [reshape(ctx, x, [m, k]), w]
    if other is not None:
        args.append(reshape(ctx, other, [m, n]))
    c = ctx.schedule("cuda.gemv", {"phase": "decode", "m": 1, "n": n, "k": k, "dtype": dtype,
                                   "out_dtype": out_dtype,
                                   "epilogue": "residual" if other is not None else ""})
    gv = ctx.kernel(("cuda_gemv", n, k, dtype, out_dtype, other is not None, ctx.pdl,
                     *config_key(c)),
                    lambda: gemv_k.gemv_kernel(n, k, dtype, out_dtype, residual=other is not None,
                                               pdl=ctx.pdl, **c))
    y = reshape(ctx, ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, n], out_dtype))),
                [*xs[:-1], n])
    if other is not None:  # the Add's output is this GEMV's
        ctx.values[add.outputs[0]] = y
        ctx.done.add(add.name)
    return y


def _residual(ctx: CudaLowerContext, node: Node, out_dtype: str):
    """(the Add consuming node's output alone, its other operand) when it can be fused into
    the GEMV's epilogue (the operand is ready and of the output's dtype), else (None, None)."""
    add = ctx.residual_adds.get(node.name)
    if add is None:
        return None, None
    name = add.inputs[1] if add.inputs[0] == node.outputs[0] else add.inputs[0]
    other = ctx.values.get(name)
    if other is None or dtype_of(other) != out_dtype or len(shape_of(other)) != 3:
        return None, None
    last = shape_of(other)[-1]
    out_features = node.attrs.get("out_features") or _static(
        shape_of(ctx.values[node.inputs[1]])[0], "out features", node)
    if not isinstance(last, tirx.IntImm) or last.value != int(out_features):
        return None, None  # a broadcast operand: the Add stays a kernel of its own
    return add, other


def _norm_gemv(ctx: CudaLowerContext, node: Node, x: relax.Expr, gamma: relax.Expr,
               eps: float) -> relax.Expr:
    w = ctx.input(node, 1)
    xs, (n, k), dtype = shape_of(x), shape_of(w), dtype_of(x)
    n, k = _static(n, "out features", node), _static(k, "in features", node)
    gate_up = _swiglu_halves(ctx, node, n)
    if gate_up is not None:
        (sp, u), f, m = gate_up, n // 2, _numel(xs[:-1])
        c = ctx.schedule("cuda.gemv_swiglu", {"phase": "decode", "m": 1, "f": f, "k": k,
                                              "dtype": dtype})
        gv = ctx.kernel(("cuda_swiglu_gemv", f, k, dtype, eps, ctx.pdl, *config_key(c)),
                        lambda: gemv_k.swiglu_gemv_kernel(f, k, dtype, eps, pdl=ctx.pdl, **c))
        y = ctx.bb.emit(R.call_tir(gv, [reshape(ctx, x, [m, k]), gamma, w],
                                   relax.TensorType([m, f], dtype)))
        ctx.values[u.outputs[0]] = reshape(ctx, y, [*xs[:-1], f])
        ctx.done.update((sp.name, u.name))
        return None
    if _rope_fusable(ctx, node, dtype, n):
        ctx.deferred_qkv[node.outputs[0]] = (x, gamma, w, eps)
        return None
    out_dtype = "float32" if node.outputs[0] in ctx.graph.outputs else dtype
    m = _numel(xs[:-1])
    c = ctx.schedule("cuda.gemv", {"phase": "decode", "m": 1, "n": n, "k": k, "dtype": dtype,
                                   "out_dtype": out_dtype, "epilogue": "norm"})
    gv = ctx.kernel(("cuda_norm_gemv", n, k, dtype, out_dtype, eps, ctx.pdl, *config_key(c)),
                    lambda: gemv_k.gemv_kernel(n, k, dtype, out_dtype, norm_eps=eps,
                                               pdl=ctx.pdl, **c))
    y = ctx.bb.emit(R.call_tir(gv, [reshape(ctx, x, [m, k]), gamma, w],
                               relax.TensorType([m, n], out_dtype)))
    return reshape(ctx, y, [*xs[:-1], n])


def _rope_fusable(ctx: CudaLowerContext, node: Node, dtype: str, n: int) -> bool:
    """Whether this (decode, norm-fused) GEMV is a q/k/v projection (a `qkv_projection`
    group) whose rotary the fused kernel covers: halves rotated over the whole head, cos/sin
    of the compute dtype's width."""
    attention = ctx.qkv_of.get(node.outputs[0])
    if attention is None:
        return False
    p, a = ctx.qkv[attention.name], attention.attrs
    h, kvh, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    cos = ctx.values.get(p.rot_q.inputs[1])
    if cos is None or p.rot_q.attrs.get("interleaved", False) or d % 2:
        return False
    cs = shape_of(cos)
    return (n == (h + 2 * kvh) * d and len(cs) == 3 and isinstance(cs[-1], tirx.IntImm)
            and cs[-1].value == d and isinstance(cs[1], tirx.IntImm) and cs[1].value == 1)


def _decode_shaped(x: relax.Expr) -> bool:
    xs = shape_of(x)
    return len(xs) == 3 and isinstance(xs[1], tirx.IntImm) and xs[1].value == 1


@lowering("rms_norm")
def _rms_norm(ctx: CudaLowerContext, node: Node) -> list[relax.Expr | None]:
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    xs = shape_of(x)
    e, eps = _static(xs[-1], "hidden size", node), float(node.attrs["eps"])
    if node.outputs[0] in ctx.norm_into and _decode_shaped(x) and dtype_of(w) == dtype_of(x):
        ctx.deferred[node.outputs[0]] = (x, w, eps)
        return [None]
    groups = 1
    if node.attrs.get("group_size"):  # per-head norm
        group = int(node.attrs["group_size"])
        groups, e = e // group, group
    m = _numel(xs[:-1]) * groups
    if groups == 1 and dtype_of(w) == dtype_of(x) and rowwise.rms_norm_supported(e, dtype_of(x)):
        c = ctx.schedule("cuda.rms_norm", {"phase": ctx.phase, "m": ctx.rows, "e": e,
                                           "dtype": dtype_of(x)})
        gv = ctx.kernel(("cuda_rms_norm", e, dtype_of(x), eps, c["rows"]),
                        lambda: rowwise.rms_norm_kernel(e, dtype_of(x), eps, rows=c["rows"]))
        y = ctx.bb.emit(R.call_tir(gv, [reshape(ctx, x, [m, e]), w],
                                   relax.TensorType([m, e], dtype_of(x))))
    else:
        y = _te(ctx, te_ops.rms_norm, reshape(ctx, x, [m, e]), w, eps)
    return [reshape(ctx, y, xs)]


@lowering("embedding")
def _embedding(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    table, ids = ctx.input(node, 0), ctx.input(node, 1)
    if node.attrs.get("packed"):
        raise KilnError(f"node {node.name} (embedding): packed tables are for the CPU kernels")
    ids_shape, e = shape_of(ids), shape_of(table)[1]
    rows = ctx.bb.emit(R.take(table, reshape(ctx, ids, [_numel(ids_shape)]), axis=0,
                                mode="clip"))
    return [reshape(ctx, rows, [*ids_shape, e])]


@lowering("rotary")
def _rotary(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    x, cos, sin = (ctx.input(node, i) for i in range(3))
    h, d = int(node.attrs["num_heads"]), int(node.attrs["head_dim"])
    inter = bool(node.attrs.get("interleaved", False))
    if dtype_of(cos) != dtype_of(x):
        cos, sin = (ctx.bb.emit(R.astype(t, dtype_of(x))) for t in (cos, sin))
    return [_te(ctx, te_ops.rotary, x, cos, sin, h, d, inter)]


@lowering("silu_mul")
def _silu_mul(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    gate, up = ctx.input(node, 0), ctx.input(node, 1)
    if [int(d) if isinstance(d, tirx.IntImm) else str(d) for d in shape_of(gate)] != [
            int(d) if isinstance(d, tirx.IntImm) else str(d) for d in shape_of(up)]:
        raise KilnError(f"node {node.name} (silu_mul): gate and up must have the same shape")
    return [_te(ctx, te_ops.silu_mul, gate, up)]


_BINARY = {"Add": R.add, "Sub": R.subtract, "Mul": R.multiply, "Div": R.divide}


@lowering(*_BINARY)
def _binary(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    return [ctx.bb.emit(_BINARY[node.op](ctx.input(node, 0), ctx.input(node, 1)))]


@lowering("Split")
def _split(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    """A split of the last axis (fused q/k/v or gate/up projections)."""
    from kiln.codegen.lower import _split_sizes

    x = ctx.input(node, 0)
    xs = shape_of(x)
    if int(node.attrs.get("axis", 0)) not in (-1, len(xs) - 1):
        raise KilnError(f"node {node.name} (Split): only the last axis is supported on CUDA")
    sizes = _split_sizes(ctx, node, _static(xs[-1], "split axis", node))
    cuts = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    parts = ctx.bb.emit(R.split(x, cuts, axis=len(xs) - 1))
    return [ctx.bb.emit(relax.TupleGetItem(parts, i)) for i in range(len(sizes))]


@lowering("quant_linear")
def _quant_linear(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    """Weight-only quantized linear (`nk` layout). Decode (one token per row, no bias): the
    quantized GEMV, dequantizing in registers, with the rms_norm in front and the SwiGLU of a
    gate/up projection or the residual Add behind fused as for fp16 weights. Otherwise: the
    tensor-core GEMM with the dequantize as its prologue (te_ops.quant_nt_matmul: one function,
    so that dlight inlines the dequantize into the weight tile's shared-memory fetch; no
    scratch weight)."""
    a = node.attrs
    if a.get("layout") != "nk":
        raise KilnError(f"node {node.name} (quant_linear): layout {a.get('layout')!r} is for "
                        "the CPU kernels; CUDA reads the `nk` layout")
    bits, group = int(a["bits"]), int(a["group_size"])
    n, k = int(a["out_features"]), int(a["in_features"])
    qw, sc, zp, b = (ctx.input(node, i) for i in (1, 2, 3, 4))
    deferred = ctx.deferred.get(node.inputs[0])
    x = deferred[0] if deferred else ctx.input(node, 0)
    xs, dtype = shape_of(x), dtype_of(x)
    out_dtype = "float32" if node.outputs[0] in ctx.graph.outputs else dtype
    decode = b is None and _decode_shaped(x) and qgemv.supported(bits, group, k)
    if deferred and not decode:
        raise KilnError(f"node {node.name} (quant_linear): a fused norm needs the decode GEMV")
    if decode:
        return [_quant_gemv(ctx, node, x, (qw, sc, zp), deferred, bits, group, out_dtype)]
    acc = "float32" if dtype in ("float16", "bfloat16") else dtype
    y = _te(ctx, te_ops.quant_nt_matmul, reshape(ctx, x, [_numel(xs[:-1]), k]), qw, sc, zp,
            bits=bits, group=group, k=k, out_dtype=acc)
    return [_gemm_epilogue(ctx, node, y, b, xs, n, acc, out_dtype)]


def _quant_gemv(ctx: CudaLowerContext, node: Node, x: relax.Expr, weight: tuple,
                deferred: tuple | None, bits: int, group: int,
                out_dtype: str) -> relax.Expr | None:
    """The quantized decode GEMV of `weight` (qweight, scales, zero points or None): with the
    rms_norm deferred into it in front (if any); behind, the SwiGLU of a gate/up projection
    (one kernel writing the silu_mul's output, the Split and silu_mul done: None returned),
    else the residual Add consuming the output (if ready)."""
    qw, sc, zp = weight
    n, k = int(node.attrs["out_features"]), int(node.attrs["in_features"])
    xs, dtype = shape_of(x), dtype_of(x)
    m, eps = _numel(xs[:-1]), deferred[2] if deferred else None
    args = [reshape(ctx, x, [m, k])] + ([deferred[1]] if deferred else []) + [qw, sc]
    args += [zp] if zp is not None else []
    gate_up = _swiglu_halves(ctx, node, n)
    if gate_up is not None:
        (sp, u), f = gate_up, n // 2
        c = ctx.schedule("cuda.quant_gemv_swiglu", {
            "phase": "decode", "m": 1, "f": f, "k": k, "bits": bits, "group": group,
            "dtype": dtype, "zero_points": zp is not None, "norm": deferred is not None})
        gv = ctx.kernel(("cuda_qgemv_swiglu", f, k, bits, group, dtype, zp is not None, eps,
                         ctx.pdl, *config_key(c)),
                        lambda: qgemv.quant_gemv_kernel(
                            n, k, bits, group, dtype, dtype, zero_points=zp is not None,
                            norm_eps=eps, swiglu=True, pdl=ctx.pdl, **c))
        y = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, f], dtype)))
        ctx.values[u.outputs[0]] = reshape(ctx, y, [*xs[:-1], f])
        ctx.done.update((sp.name, u.name))
        return None
    add, other = (None, None) if deferred else _residual(ctx, node, out_dtype)
    c = ctx.schedule("cuda.quant_gemv", {
        "phase": "decode", "m": 1, "n": n, "k": k, "bits": bits, "group": group,
        "dtype": dtype, "out_dtype": out_dtype, "zero_points": zp is not None,
        "epilogue": "norm" if deferred else "residual" if other is not None else ""})
    gv = ctx.kernel(("cuda_qgemv", n, k, bits, group, dtype, out_dtype, zp is not None,
                     other is not None, eps, ctx.pdl, *config_key(c)),
                    lambda: qgemv.quant_gemv_kernel(
                        n, k, bits, group, dtype, out_dtype, zero_points=zp is not None,
                        residual=other is not None, norm_eps=eps, pdl=ctx.pdl, **c))
    args += [reshape(ctx, other, [m, n])] if other is not None else []
    y2 = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType([m, n], out_dtype)))
    return _finish(ctx, node, y2, xs, n, add)


def _gemm_epilogue(ctx: CudaLowerContext, node: Node, y: relax.Expr, b: relax.Expr | None,
                   xs, n: int, acc: str, out_dtype: str) -> relax.Expr:
    """Bias, the cast to the output dtype and the residual Add consuming the output, on the
    2-D GEMM result (before any reshape, which would keep FuseOps from fusing them into the
    GEMM's epilogue)."""
    if b is not None:
        y = ctx.bb.emit(R.add(y, R.astype(b, acc) if dtype_of(b) != acc else b))
    if out_dtype != acc:
        y = ctx.bb.emit(R.astype(y, out_dtype))
    add, other = _residual(ctx, node, out_dtype)
    if other is not None:
        y = ctx.bb.emit(R.add(y, reshape(ctx, other, [_numel(xs[:-1]), n])))
    return _finish(ctx, node, y, xs, n, add)


def _finish(ctx: CudaLowerContext, node: Node, y: relax.Expr, xs, n: int,
            fused_add: Node | None) -> relax.Expr:
    """A projection kernel's y[m, n] back in x's leading shape: the SwiGLU that reads it fused
    in (_swiglu), and the residual Add its epilogue computed (if any) bound and done."""
    _swiglu(ctx, node, y, xs, n)
    y = reshape(ctx, y, [*xs[:-1], n])
    if fused_add is not None:
        ctx.values[fused_add.outputs[0]] = y
        ctx.done.add(fused_add.name)
    return y


def _swiglu_halves(ctx: CudaLowerContext, node: Node, n: int) -> tuple[Node, Node] | None:
    """(Split, silu_mul) when node's output (n features) is a gate/up projection (a `swiglu`
    group) split into equal halves, gate first: what the fused SwiGLU kernels compute."""
    from kiln.codegen.lower import _split_sizes

    if node.name not in ctx.swiglu or n % 2:
        return None
    sp, u = ctx.swiglu[node.name]
    return (sp, u) if _split_sizes(ctx, sp, n) == [n // 2, n // 2] else None


def _swiglu(ctx: CudaLowerContext, node: Node, y: relax.Expr, xs, n: int) -> None:
    """When y[m, n] (2-D) is a gate/up projection read only by Split -> silu_mul: the split and
    SwiGLU as one vectorized kernel; the silu_mul's output bound, both nodes done."""
    gate_up = _swiglu_halves(ctx, node, n)
    f, dtype = n // 2, dtype_of(y)
    if gate_up is None or not rowwise.swiglu_supported(f, dtype):
        return
    sp, u = gate_up
    m = _numel(xs[:-1])
    c = ctx.schedule("cuda.swiglu", {"phase": ctx.phase, "m": ctx.rows, "f": f, "dtype": dtype})
    gv = ctx.kernel(("cuda_swiglu", f, dtype, c["threads"]),
                    lambda: rowwise.swiglu_kernel(f, dtype, threads=c["threads"]))
    out = ctx.bb.emit(R.call_tir(gv, [y], relax.TensorType([m, f], dtype)))
    ctx.values[u.outputs[0]] = reshape(ctx, out, [*xs[:-1], f])
    ctx.done.update((sp.name, u.name))


@lowering("quant_embedding")
def _quant_embedding(ctx: CudaLowerContext, node: Node) -> list[relax.Expr]:
    a = node.attrs
    if a.get("layout") != "nk":
        raise KilnError(f"node {node.name} (quant_embedding): layout {a.get('layout')!r} is "
                        "for the CPU kernels; CUDA reads the `nk` layout")
    qw, sc, zp, ids = (ctx.input(node, i) for i in range(4))
    ids_shape, k = shape_of(ids), int(a["in_features"])
    rows = _te(ctx, te_ops.quant_rows, qw, sc, zp, reshape(ctx, ids, [_numel(ids_shape)]),
               bits=int(a["bits"]), group=int(a["group_size"]), k=k, dtype=dtype_of(sc))
    return [reshape(ctx, rows, [*ids_shape, k])]


# the attention lowerings (KV cache, q/k/v fusion), the 2:4 sparse linear and the fallbacks
# of the ops outside the fast paths (LayerNorm, GELU, Range ...) register themselves into
# CUDA_LOWERINGS
from kiln.codegen.cuda import lower_attention, lower_generic, lower_sparse  # noqa: E402, F401
