"""The lowering table: canonical kiln IR op -> Relax calls into kiln's TIR kernels (CPU).

A lowering takes the LowerContext and the node, reads its inputs' Relax expressions from
`ctx.values` and returns one Relax expression per node output (None for outputs nobody may read).
Kernels are created once per distinct shape/attribute key and shared by every node and entry point.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import sympy
from tvm import relax, tirx
from tvm.relax import op as R

from kiln.codegen import cpu_spaces  # noqa: F401 - registers the cpu.* schedule spaces
from kiln.codegen.kernels import attention as attn_k
from kiln.codegen.kernels import elementwise as ew
from kiln.codegen.kernels import linear as lin
from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.kernels import prefill_attention as pattn
from kiln.codegen.kernels import with_root_block
from kiln.codegen.schedules import Schedules
from kiln.codegen.targets import KilnTarget
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Graph, Node


@dataclass
class LowerContext:
    """State shared by the lowerings while one entry point is emitted."""

    bb: relax.BlockBuilder
    graph: Graph
    target: KilnTarget
    phase: str  # "prefill" | "decode": part of every kernel instance's schedule shape
    past: tirx.Var  # tokens already in the KV cache
    values: dict[str, relax.Expr] = field(default_factory=dict)
    caches: dict[str, relax.Expr] = field(default_factory=dict)  # past_k/v input -> cache
    kernels: dict[tuple, relax.GlobalVar] = field(default_factory=dict)
    symbols: dict[str, tirx.PrimExpr] = field(default_factory=dict)  # batch, seq, past
    #: where kernel configs come from (kiln.codegen.schedules: tuning database or cost model)
    schedules: Schedules | None = None
    #: the rows a prefill is tuned for (kernel instances' `m`; decode runs 1)
    prefill_rows: int = 512
    #: the cached length a decode entry's kernels are scheduled for (0: the backend's own)
    decode_past: int = 0

    def schedule(self, kernel: str, shape: dict) -> dict:
        """The config of one kernel instance of schedule space `kernel` (recorded)."""
        if self.schedules is None:
            self.schedules = Schedules(self.target)
        return self.schedules.pick(kernel, shape)

    def kernel(self, key: tuple, make: Callable[[], tirx.PrimFunc]) -> relax.GlobalVar:
        """The GlobalVar of the kernel for `key`, adding it to the module on first use."""
        if key not in self.kernels:
            name = "_".join(str(k).replace(".", "p").replace("-", "m") for k in key)
            self.kernels[key] = self.bb.add_func(with_root_block(make()), name)
        return self.kernels[key]

    def input(self, node: Node, i: int) -> relax.Expr | None:
        if i >= len(node.inputs) or not node.inputs[i]:
            return None
        return self.values[node.inputs[i]]

    @property
    def rows(self) -> int:
        """Rows (tokens) one call of this entry point's kernels sees, as tuned."""
        return 1 if self.phase == "decode" else self.prefill_rows

    def par(self, op: str, e: int, dtype: str = "float32") -> bool:
        """Whether the memory-bound kernel `op` over rows of `e` elements runs on the thread
        pool (schedule space cpu.rowwise)."""
        shape = {"phase": self.phase, "op": op, "e": int(e), "m": self.rows, "dtype": dtype}
        return bool(self.schedule("cpu.rowwise", shape)["parallel"])

    @property
    def lanes(self) -> int:
        return self.target.lanes(4) if hasattr(self.target, "lanes") else 16


Lowering = Callable[[LowerContext, Node], Sequence[relax.Expr | None]]
LOWERINGS: dict[str, Lowering] = {}


def lowering(*ops: str) -> Callable[[Lowering], Lowering]:
    def register(fn: Lowering) -> Lowering:
        for op in ops:
            LOWERINGS[op] = fn
        return fn

    return register


def lower_node(ctx: LowerContext, node: Node) -> None:
    """Emit `node` into ctx.bb and bind its outputs in ctx.values."""
    fn = LOWERINGS.get(node.op)
    if fn is None:
        raise KilnError(f"no lowering for op {node.op} (node {node.name}) on target "
                        f"{ctx.target.name}")
    outs = lowered(fn, ctx, node)
    for name, expr in zip(node.outputs, outs, strict=False):
        if name and expr is not None:
            ctx.values[name] = expr


def lowered(fn: Lowering, ctx, node: Node):
    """`fn(ctx, node)`, with a lowering that trips over its input (a shape it cannot read, a
    dtype it does not take) reported as one line naming the node, op and target, not a trace."""
    try:
        return fn(ctx, node)
    except (AttributeError, TypeError, ValueError, IndexError, ArithmeticError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"cannot lower node {node.name} (op {node.op}) on target "
                        f"{ctx.target.name}: {type(e).__name__}: {first}") from e


# ---------------------------------------------------------------------------------------------
# shape helpers


def shape_of(expr: relax.Expr) -> list[tirx.PrimExpr]:
    return list(expr.ty.shape.values)


def dtype_of(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _numel(dims: Sequence[tirx.PrimExpr]) -> tirx.PrimExpr:
    total = tirx.const(1, "int64")
    for d in dims:
        total = total * d
    return total


def _static(d: tirx.PrimExpr, what: str, node: Node | None) -> int:
    if isinstance(d, tirx.IntImm):
        return int(d.value)
    where = f"node {node.name} ({node.op})" if node is not None else "kiln"
    raise KilnError(f"{where}: {what} must be static, got {d}")


def reshape(ctx: LowerContext, x: relax.Expr, dims: Sequence[tirx.PrimExpr]) -> relax.Expr:
    return ctx.bb.emit(R.reshape(x, list(dims)))


def call(ctx: LowerContext, gv: relax.GlobalVar, args: Sequence[relax.Expr],
         shape: Sequence[tirx.PrimExpr], dtype: str) -> relax.Expr:
    return ctx.bb.emit(R.call_tir(gv, list(args), relax.TensorType(list(shape), dtype)))


def to_prim(d: sympy.Expr | int, symbols: dict[str, tirx.PrimExpr]) -> tirx.PrimExpr:
    """A kiln dim (int or sympy expression over named symbols) as a TIR int64 expression."""
    if isinstance(d, int) or (isinstance(d, sympy.Basic) and d.is_Integer):
        return tirx.const(int(d), "int64")
    if isinstance(d, sympy.Symbol):
        return symbols[d.name]
    if isinstance(d, sympy.Add | sympy.Mul):
        parts = [to_prim(a, symbols) for a in d.args]
        out = parts[0]
        for p in parts[1:]:
            out = out + p if isinstance(d, sympy.Add) else out * p
        return out
    raise KilnError(f"cannot lower symbolic dim {d}")


def last_position(ctx: LowerContext, x: relax.Expr) -> relax.Expr:
    """x[b, s, e] -> x[b, s-1 : s, e]: the one position whose logits a generation loop reads."""
    b, _, e = shape_of(x)
    e, dtype = _static(e, "hidden size", None), dtype_of(x)
    gv = ctx.kernel(("last_position", e, dtype), lambda: ew.last_position_kernel(e, dtype=dtype))
    return call(ctx, gv, [x], [b, 1, e], dtype)


# ---------------------------------------------------------------------------------------------
# canonical ops


@lowering("linear")
def _linear(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, w, b = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    if node.attrs.get("packed"):
        return [_packed_linear(ctx, node, x, w, b)]
    xs, (n, k) = shape_of(x), shape_of(w)
    n, k = _static(n, "out features", node), _static(k, "in features", node)
    dtype = dtype_of(x)
    shape = {"phase": ctx.phase, "m": ctx.rows, "n": n, "k": k, "bias": b is not None,
             "dtype": dtype}
    cfg = lin.LinearConfig(**ctx.schedule("cpu.linear", shape))
    tiling = (cfg.mr, cfg.nr, cfg.mb, cfg.nb, cfg.prefetch)
    gv = ctx.kernel(("linear", n, k, *tiling, b is not None, dtype),
                    lambda: lin.linear_kernel(n, k, cfg, bias=b is not None, lanes=ctx.lanes,
                                              dtype=dtype))
    m = _numel(xs[:-1])
    x2 = reshape(ctx, x, [m, k])
    y = call(ctx, gv, [x2, w] + ([b] if b is not None else []), [m, n], dtype)
    return [reshape(ctx, y, [*xs[:-1], n])]


def _packed_linear(ctx: LowerContext, node: Node, x: relax.Expr, w: relax.Expr,
                   b: relax.Expr | None) -> relax.Expr:
    """A linear whose weight pack_linear_weights laid out as [N / block, K, block]."""
    xs, (nb, k, block) = shape_of(x), shape_of(w)
    k, block = _static(k, "in features", node), _static(block, "pack block", node)
    n, dtype = _static(nb, "weight blocks", node) * block, dtype_of(x)
    shape = {"phase": ctx.phase, "m": ctx.rows, "n": n, "k": k, "block": block,
             "bias": b is not None, "dtype": dtype}
    cfg = plin.PackedConfig(**ctx.schedule("cpu.packed_linear", shape))
    gv = ctx.kernel(("plinear", n, k, block, cfg.mr, cfg.nv, b is not None, dtype),
                    lambda: plin.packed_linear_kernel(n, k, cfg, bias=b is not None,
                                                      lanes=block, dtype=dtype))
    m = _numel(xs[:-1])
    y = call(ctx, gv, [reshape(ctx, x, [m, k]), w] + ([b] if b is not None else []), [m, n],
             dtype)
    return reshape(ctx, y, [*xs[:-1], n])


@lowering("rms_norm")
def _rms_norm(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, w = ctx.input(node, 0), ctx.input(node, 1)
    xs, dtype = shape_of(x), dtype_of(x)
    e, eps = _static(xs[-1], "hidden size", node), float(node.attrs["eps"])
    groups = 1
    if node.attrs.get("group_size"):  # per-head norm: each run of group_size features alone
        group = int(node.attrs["group_size"])
        groups, e = e // group, group
    par = ctx.par("rms_norm", e, dtype)
    gv = ctx.kernel(("rms_norm", e, eps, dtype, par),
                    lambda: ew.rms_norm_kernel(e, eps, lanes=ctx.lanes, dtype=dtype,
                                               parallel=par))
    m = _numel(xs[:-1]) * groups
    y = call(ctx, gv, [reshape(ctx, x, [m, e]), w], [m, e], dtype)
    return [reshape(ctx, y, xs)]


@lowering("embedding")
def _embedding(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    table, ids = ctx.input(node, 0), ctx.input(node, 1)
    ids_shape, dtype, idt = shape_of(ids), dtype_of(table), dtype_of(ids)
    block = int(node.attrs.get("packed", 0))
    if block:  # a tied table packed for the LM head: [V / block, E, block]
        nb, e, _ = (_static(d, "table dims", node) for d in shape_of(table))
        v, par = nb * block, ctx.par("embedding", e, dtype)
        gv = ctx.kernel(("pembedding", v, e, block, dtype, idt, par),
                        lambda: ew.packed_embedding_kernel(v, e, block, dtype=dtype,
                                                           index_dtype=idt, parallel=par))
    else:
        v, e = (_static(d, "table dims", node) for d in shape_of(table))
        par = ctx.par("embedding", e, dtype)
        gv = ctx.kernel(("embedding", v, e, dtype, idt, par),
                        lambda: ew.embedding_kernel(v, e, lanes=ctx.lanes, dtype=dtype,
                                                    index_dtype=idt, parallel=par))
    m = _numel(ids_shape)
    y = call(ctx, gv, [table, reshape(ctx, ids, [m])], [m, e], dtype)
    return [reshape(ctx, y, [*ids_shape, e])]


@lowering("rotary")
def _rotary(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, cos, sin = (ctx.input(node, i) for i in range(3))
    h, d = int(node.attrs["num_heads"]), int(node.attrs["head_dim"])
    r = _static(shape_of(cos)[-1], "rotary dim", node)
    inter, dtype = bool(node.attrs.get("interleaved", False)), dtype_of(x)
    par = ctx.par("rotary", h * d, dtype)
    gv = ctx.kernel(("rotary", h, d, r, inter, dtype, par),
                    lambda: ew.rotary_kernel(h, d, r, interleaved=inter, dtype=dtype,
                                             parallel=par))
    return [call(ctx, gv, [x, cos, sin], shape_of(x), dtype)]


@lowering("silu")
def _silu(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    return [_flat_map(ctx, ("unary", "silu"), [ctx.input(node, 0)],
                      lambda dt, par: ew.unary_kernel(ew.UNARY["silu"], lanes=ctx.lanes,
                                                      dtype=dt, parallel=par))]


@lowering("gelu")
def _gelu(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    name = "gelu_tanh" if node.attrs.get("approximate", "none") == "tanh" else "gelu"
    return [_flat_map(ctx, ("unary", name), [ctx.input(node, 0)],
                      lambda dt, par: ew.unary_kernel(ew.UNARY[name], lanes=ctx.lanes,
                                                      dtype=dt, parallel=par))]


@lowering("layer_norm")
def _layer_norm(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    x, w, b = ctx.input(node, 0), ctx.input(node, 1), ctx.input(node, 2)
    xs, dtype = shape_of(x), dtype_of(x)
    e, eps = _static(xs[-1], "hidden size", node), float(node.attrs["eps"])
    par = ctx.par("layer_norm", e, dtype)
    gv = ctx.kernel(("layer_norm", e, eps, b is not None, dtype, par),
                    lambda: ew.layer_norm_kernel(e, eps, bias=b is not None, dtype=dtype,
                                                 parallel=par))
    m = _numel(xs[:-1])
    args = [reshape(ctx, x, [m, e]), w] + ([b] if b is not None else [])
    return [reshape(ctx, call(ctx, gv, args, [m, e], dtype), xs)]


@lowering("Split")
def _split(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    """A split of the last axis (fused q/k/v or gate/up projections): one column copy each."""
    x = ctx.input(node, 0)
    xs, dtype = shape_of(x), dtype_of(x)
    axis = int(node.attrs.get("axis", 0))
    if axis not in (-1, len(xs) - 1):
        raise KilnError(f"node {node.name} (Split): only the last axis has a CPU kernel, "
                        f"got axis {axis}")
    n = _static(xs[-1], "split axis", node)
    sizes = _split_sizes(ctx, node, n)
    m = _numel(xs[:-1])
    x2, outs, start = reshape(ctx, x, [m, n]), [], 0
    par = ctx.par("columns", n, dtype)
    for width in sizes:
        gv = ctx.kernel(("columns", n, start, width, dtype, par),
                        lambda s=start, w=width: ew.columns_kernel(n, s, w, dtype=dtype,
                                                                   parallel=par))
        outs.append(reshape(ctx, call(ctx, gv, [x2], [m, width], dtype), [*xs[:-1], width]))
        start += width
    return outs


def _split_sizes(ctx: LowerContext, node: Node, n: int) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1]:
        if node.inputs[1] not in ctx.graph.params:
            raise KilnError(f"node {node.name} (Split): split sizes must be constant")
        return [int(v) for v in ctx.graph.params[node.inputs[1]].load().reshape(-1)]
    if node.attrs.get("split") is not None:
        return [int(v) for v in node.attrs["split"]]
    count = len(node.outputs)
    chunk = -(-n // count)
    return [chunk] * (count - 1) + [n - chunk * (count - 1)]


@lowering(*ew.BINARY)
def _binary(ctx: LowerContext, node: Node) -> list[relax.Expr]:
    a, b = ctx.input(node, 0), ctx.input(node, 1)
    ta, tb = (ctx.graph.types.get(v) for v in node.inputs[:2])
    same = ta is not None and tb is not None and ta.shape == tb.shape and ta.dtype == tb.dtype
    if not same and node.op == "silu_mul":
        raise KilnError(f"node {node.name} (silu_mul): gate and up must have the same shape")
    if not same:
        fallback = {"Add": R.add, "Sub": R.subtract, "Mul": R.multiply, "Div": R.divide}
        return [ctx.bb.emit(fallback[node.op](a, b))]  # broadcasting: TVM's legalized op
    fn = ew.BINARY[node.op]
    return [_flat_map(ctx, ("binary", node.op), [a, b],
                      lambda dt, par: ew.binary_kernel(fn, lanes=ctx.lanes, dtype=dt,
                                                       parallel=par))]


def _flat_map(ctx: LowerContext, key: tuple, args: list[relax.Expr],
              make: Callable[[str, bool], tirx.PrimFunc], *, out_dtype: str | None = None,
              ) -> relax.Expr:
    """One flat kernel over all elements; `make(dtype, parallel)`. Its schedule shape names
    the op by `key` and the rows by the static last dim (the width of a row)."""
    shape, dtype = shape_of(args[0]), dtype_of(args[0])
    last = shape[-1] if shape else tirx.const(1, "int64")
    e = int(last.value) if isinstance(last, tirx.IntImm) else 0
    par = ctx.par(":".join(str(k) for k in key), e, dtype)
    gv = ctx.kernel((*key, dtype, par), lambda: make(dtype, par))
    n = _numel(shape)
    flat = [reshape(ctx, a, [n]) for a in args]
    return reshape(ctx, call(ctx, gv, flat, [n], out_dtype or dtype), shape)


@lowering("attention")
def _attention(ctx: LowerContext, node: Node) -> list[relax.Expr | None]:
    q, k, v = (ctx.input(node, i) for i in range(3))
    mask, bias = ctx.input(node, 5), ctx.input(node, 6)
    if bias is not None:
        raise KilnError(f"node {node.name} (attention): an additive bias has no CPU kernel yet")
    past_k, past_v = (node.inputs[i] if len(node.inputs) > i else "" for i in (3, 4))
    if past_k not in ctx.caches or past_v not in ctx.caches:
        raise KilnError(f"node {node.name} (attention): past_k/past_v must be graph inputs "
                        "(they become the in-place KV cache)")
    a = node.attrs
    h, kvh, d = int(a["num_heads"]), int(a["num_kv_heads"]), int(a["head_dim"])
    dtype, causal = dtype_of(q), bool(a.get("causal", False))
    q8 = int(a.get("kv_bits", 0)) == 8  # int8 rows + per-row scales (kv8)
    names = [past_k, past_v] + ([scale_cache(past_k), scale_cache(past_v)] if q8 else [])
    caches = [ctx.caches[n] for n in names]
    make = attn_k.kv_append_q8_kernel if q8 else attn_k.kv_append_kernel
    par = ctx.par("kv_append", kvh * d, dtype)
    append = ctx.kernel(("kv_append", q8, kvh, d, dtype, par),
                        lambda: make(kvh, d, dtype=dtype, parallel=par))
    past = relax.prim_value(ctx.past)
    upd = ctx.bb.emit(R.call_tir_inplace(append, [*caches, k, v, past], list(range(len(caches))),
                                         [c.ty for c in caches]))
    caches = [ctx.bb.emit(relax.TupleGetItem(upd, i)) for i in range(len(caches))]
    scale = float(a.get("scale", 1.0 / math.sqrt(d)))
    mdt = dtype_of(mask) if mask is not None else "int64"
    window = int(a.get("window") or 0)
    if window and not causal:
        raise KilnError(f"node {node.name} (attention): a sliding window needs causal attention")
    gv = _attention_kernel(ctx, h, kvh, d, scale, causal, mask is not None, dtype, mdt, q8,
                           window)
    args = [q, *caches] + ([mask] if mask is not None else []) + [past]
    out = ctx.bb.emit(R.call_tir(gv, args, relax.TensorType(shape_of(q), dtype)))
    ctx.caches.update(zip(names, caches, strict=True))
    return [out, caches[0], caches[1]]


def scale_cache(name: str) -> str:
    """The name of the per-row scale buffer beside an int8 cache buffer."""
    return f"{name}:scale"


def _attention_kernel(ctx: LowerContext, h: int, kvh: int, d: int, scale: float, causal: bool,
                      masked: bool, dtype: str, mdt: str, q8: bool,
                      window: int = 0) -> relax.GlobalVar:
    """Query-tiled kernel (prefill, when D fills whole vectors) or one query per task, as the
    schedule space cpu.attention says."""
    rows = ctx.rows
    shape = {"phase": ctx.phase, "heads": h, "kv_heads": kvh, "head_dim": d, "scale": scale,
             "causal": causal, "masked": masked, "dtype": dtype, "mask_dtype": mdt, "q8": q8,
             "window": window, "s": rows,  # decode: one query over a prompt's worth of keys
             "past": 0 if ctx.phase == "prefill" else ctx.prefill_rows}
    c = ctx.schedule("cpu.attention", shape)
    if c["tiled"]:
        qt = c["queries"]
        return ctx.kernel(("pattention", h, kvh, d, scale, causal, masked, qt, mdt, q8, window),
                          lambda: pattn.prefill_attention_kernel(
                              h, kvh, d, scale, queries=qt, causal=causal, masked=masked,
                              dtype=dtype, mask_dtype=mdt, quantized=q8, window=window))
    blk = c["block"]
    return ctx.kernel(("attention", h, kvh, d, scale, causal, masked, blk, dtype, mdt, q8,
                       window),
                      lambda: attn_k.attention_kernel(h, kvh, d, scale, causal=causal,
                                                      masked=masked, block=blk, dtype=dtype,
                                                      mask_dtype=mdt, quantized=q8,
                                                      window=window))
