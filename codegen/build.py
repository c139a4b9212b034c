"""Build a Relax IRModule with `prefill` and `decode` entry points from a canonical kiln graph.

Entry-point signature (both), in this order:
    past: R.Shape([past])                      tokens already in the KV cache
    <graph inputs>                             except past_k/past_v, in graph order; in decode
                                               the `seq` symbol is 1
    kv_cache: R.Tuple(k_0, v_0, k_1, v_1 ...)  each (batch, kv_heads, capacity, head_dim),
                                               written in place at rows past..past+seq-1
    params: R.Tuple(...)                       graph parameters, in `ModuleSignature.params` order
and returns the graph outputs except the present_k/v ones (a tuple when there are several).
`prefill_last` is `prefill` whose output linear (the LM head) runs on the last position of each
row only: logits (batch, 1, vocab), all a generation loop needs, at a fraction of the work.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tvm import relax, tirx

from kiln.codegen import (
    lower_elementwise,  # noqa: F401 - registers the generic op lowerings
    lower_quant,  # noqa: F401 - registers quant_linear/quant_embedding
    lower_shapes,  # noqa: F401 - registers shape-op lowerings (Reshape, Range, Concat ...)
    lower_sparse,  # noqa: F401 - registers sparse_linear
)
from kiln.codegen.lower import (
    LowerContext,
    last_position,
    lower_node,
    scale_cache,
    to_prim,
)
from kiln.codegen.schedules import Schedules
from kiln.codegen.targets import CpuTarget, CudaTarget, KilnTarget
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import BATCH, PAST, SEQ, Graph

ENTRY_POINTS = ("prefill", "decode", "prefill_last")
#: the phase each entry point's kernel instances are scheduled for
_PHASE = {"prefill": "prefill", "decode": "decode", "prefill_last": "prefill"}


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """One KV cache buffer: (batch, kv_heads, capacity, head_dim) of dtype."""

    name: str  # the graph input (past_k/past_v) it replaces
    kv_heads: int
    head_dim: int
    dtype: str


@dataclass(frozen=True, slots=True)
class ModuleSignature:
    """How to call the compiled entry points (what the runtime needs besides the library)."""

    inputs: tuple[str, ...]
    caches: tuple[CacheSpec, ...]
    params: tuple[str, ...]
    outputs: tuple[str, ...]
    entry_points: tuple[str, ...]


def build_module(graph: Graph, target: KilnTarget, *,
                 entry_points: Sequence[str] = ENTRY_POINTS,
                 schedules: Schedules | None = None, prefill_rows: int = 512,
                 ) -> tuple[object, ModuleSignature]:
    """The Relax IRModule (kernels included) and its calling convention. `schedules` answers
    the lowerings' config questions (a tuning database, else the cost model) and keeps what
    each kernel instance got, for the manifest; prefill kernel instances are looked up at
    `prefill_rows` rows (the prompt length they are tuned for)."""
    if not isinstance(target, CpuTarget | CudaTarget):
        raise KilnError(f"target {target.name}: no kernels (expected cpu or cuda)")
    sig = signature(graph, entry_points)
    if isinstance(target, CudaTarget):  # cache dtype, inputs the CUDA kernels never read
        from kiln.codegen.cuda import backend

        sig = backend.cuda_signature(graph, target, sig)
    bb = relax.BlockBuilder()
    kernels: dict = {}
    schedules = schedules if schedules is not None else Schedules(target)
    for entry in entry_points:
        _emit_entry(bb, graph, target, sig, entry, kernels, schedules, prefill_rows)
    return bb.get(), sig


def compile_module(mod: object, target: KilnTarget):
    """tvm.compile: kiln's kernels are already scheduled, the default pipeline lowers to the VM."""
    import tvm

    if isinstance(target, CudaTarget):
        from kiln.codegen.cuda import backend

        return backend.compile_module(mod, target)
    pipeline = tvm.transform.Sequential([tvm.relax.get_pipeline("default"), mark_noalias()])
    with target.tvm_target():
        return tvm.compile(mod, target=target.tvm_target(), relax_pipeline=pipeline)


def compile_kernels(funcs: dict[str, tirx.PrimFunc], target: KilnTarget,
                    path: str | os.PathLike) -> None:
    """Compile standalone kernels (`kiln tune`'s candidates) into one library at `path`, each
    exported under its name, through the target's toolchain as `build` does (CUDA: nvcc
    machine code for the arch, cross-compiled where no GPU exists)."""
    import tvm

    from kiln.codegen.kernels import with_root_block

    mod = tvm.IRModule({name: with_root_block(f).with_attr("global_symbol", name)
                        for name, f in funcs.items()})
    if isinstance(target, CudaTarget):
        from kiln.codegen import cuda_toolchain as ct
        from kiln.codegen.cuda.kernels import pdl

        with tvm.transform.PassContext(opt_level=3):
            lib = ct.compile_for_cuda(mod, target.tvm_target(), tir_pipeline=pdl.PIPELINE)
    else:
        with target.tvm_target():
            lib = tvm.compile(mark_noalias()(mod), target=target.tvm_target())
    lib.export_library(os.fspath(path))
    if isinstance(target, CudaTarget):
        from kiln.codegen.cuda_toolchain import require_fatbin

        require_fatbin(path, target.arch)


def mark_noalias():
    """Mark every PrimFunc `tirx.noalias`, the VM's generated shape functions included.

    LLVM codegen drops the noalias parameter attributes of *every* function of a module as soon as
    one function lacks `tirx.noalias` (the VM's shape_func does), and without them LLVM must assume
    the output buffer may alias a kernel's register-tile accumulators: it stores each accumulator
    after every FMA. Measured on the packed GEMM (3072x576, m = 512, one thread): 43 ms in a VM
    module vs 17 ms alone. kiln's kernels never pass one buffer twice; the shape functions read and
    write a single heap buffer.
    """
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="KilnMarkNoAlias")
    def _mark(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            marked = func.attrs is not None and func.attrs.get("tirx.noalias")
            if isinstance(func, tvm.tirx.PrimFunc) and not marked:
                mod[gv] = func.with_attr("tirx.noalias", True)
        return mod

    return _mark


def build(graph: Graph, target: KilnTarget, path: str | os.PathLike, *,
          progress: Callable[[str], None] = lambda msg: None, **kw) -> ModuleSignature:
    """Build, compile and export the shared library at `path`; returns its calling convention.
    `progress` hears of each step (the last two take most of a large model's compile)."""
    progress(f"generating kernels for {target.name}")
    mod, sig = build_module(graph, target, **kw)
    progress(f"compiling kernels for {target.name} "
             f"({'nvcc' if isinstance(target, CudaTarget) else 'LLVM'})")
    executable = compile_module(mod, target)
    progress(f"linking {os.path.basename(path)}")
    executable.export_library(os.fspath(path))
    if isinstance(target, CudaTarget):  # machine code, never CUDA source
        from kiln.codegen.cuda_toolchain import require_fatbin

        require_fatbin(path, target.arch)
    return sig


def signature(graph: Graph, entry_points: Sequence[str] = ENTRY_POINTS) -> ModuleSignature:
    caches = _cache_specs(graph)
    cache_names = {c.name for c in caches}
    presents = _present_outputs(graph)
    unknown = [e for e in entry_points if e not in ENTRY_POINTS]
    if unknown:
        raise KilnError(f"unknown entry points {unknown} (expected {list(ENTRY_POINTS)})")
    return ModuleSignature(
        inputs=tuple(v for v in graph.inputs if v not in cache_names),
        caches=caches,
        params=tuple(graph.params),
        outputs=tuple(v for v in graph.outputs if v not in presents),
        entry_points=tuple(entry_points))


def _cache_specs(graph: Graph) -> tuple[CacheSpec, ...]:
    specs = []
    for node in graph.nodes:
        if node.op != "attention":
            continue
        for i in (3, 4):
            name = node.inputs[i] if len(node.inputs) > i else ""
            if not name or name not in graph.inputs:
                raise KilnError(f"node {node.name} (attention): input {i} must be a graph "
                                "input (past_k/past_v), it becomes the KV cache")
            t, kvh = graph.types[name], int(node.attrs["num_kv_heads"])
            if int(node.attrs.get("kv_bits", 0)) == 8:  # int8 rows, a float32 scale per row
                specs += [CacheSpec(name, kvh, int(node.attrs["head_dim"]), "int8"),
                          CacheSpec(scale_cache(name), kvh, 1, "float32")]
            else:
                specs.append(CacheSpec(name, kvh, int(node.attrs["head_dim"]), t.dtype.value))
    return tuple(specs)


def _present_outputs(graph: Graph) -> set[str]:
    return {o for n in graph.nodes if n.op == "attention" for o in n.outputs[1:3] if o}


def _emit_entry(bb: relax.BlockBuilder, graph: Graph, target: KilnTarget,
                sig: ModuleSignature, entry: str, kernels: dict, schedules: Schedules,
                prefill_rows: int) -> None:
    b, past, cap = (tirx.Var(n, "int64") for n in ("batch", "past", "capacity"))
    seq = tirx.const(1, "int64") if entry == "decode" else tirx.Var("seq", "int64")
    symbols = {BATCH: b, SEQ: seq, PAST: past}
    past_arg = relax.Var("past", relax.ShapeType([past]))
    inputs = [_input_var(graph, v, symbols) for v in sig.inputs]
    cache_ty = [relax.TensorType([b, c.kv_heads, cap, c.head_dim], c.dtype) for c in sig.caches]
    caches = relax.Var("kv_cache", relax.TupleType(cache_ty))
    params = relax.Var("params", relax.TupleType(
        [relax.TensorType([int(d) for d in graph.params[p].type.shape],
                          _param_dtype(target, graph.params[p].type.dtype.value))
         for p in sig.params]))
    cuda = isinstance(target, CudaTarget)
    if cuda:
        from kiln.codegen.cuda import backend
        from kiln.codegen.cuda import lower as cuda_lower
    attrs = backend.entry_attrs(target, entry, 1 + len(inputs)) if cuda else None
    lower, last = (cuda_lower.lower_node, cuda_lower.last_position) if cuda else (
        lower_node, last_position)
    with bb.function(entry, [past_arg, *inputs, caches, params], attrs=attrs):
        with bb.dataflow():
            ctx = (cuda_lower.CudaLowerContext if cuda else LowerContext)(
                bb, graph, target, _PHASE[entry], past, kernels=kernels, schedules=schedules,
                prefill_rows=prefill_rows)
            ctx.symbols.update(symbols)
            ctx.values.update(zip(sig.inputs, inputs, strict=True))
            if cuda:
                ctx.values.update(backend.computed_inputs(ctx, graph, sig, b, seq))
            for i, p in enumerate(sig.params):
                ctx.values[p] = bb.emit(relax.TupleGetItem(params, i))
            for i, c in enumerate(sig.caches):
                ctx.caches[c.name] = bb.emit(relax.TupleGetItem(caches, i))
            heads = _output_linears(graph, sig) if entry == "prefill_last" else set()
            for node in graph.nodes:
                if node.name in heads:
                    ctx.values[node.inputs[0]] = last(ctx, ctx.values[node.inputs[0]])
                lower(ctx, node)
            outs = [ctx.values[o] for o in sig.outputs]
            if cuda and entry == "decode":  # + the greedy tokens, picked on the device
                outs.append(backend.greedy_tokens(ctx, outs[0]))
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)


def _param_dtype(target: KilnTarget, dtype: str) -> str:
    if isinstance(target, CudaTarget):
        from kiln.codegen.cuda.backend import param_dtype

        return param_dtype(target, dtype)
    return dtype


def _output_linears(graph: Graph, sig: ModuleSignature) -> set[str]:
    """Names of the linear nodes producing graph outputs (the LM head) from their own input."""
    outs = set(sig.outputs)
    users = graph.consumers()
    return {n.name for n in graph.nodes if n.op in ("linear", "quant_linear", "sparse_linear")
            and n.outputs[0] in outs
            and len(users.get(n.inputs[0], [])) == 1
            and len(graph.types[n.inputs[0]].shape or ()) == 3}


def _input_var(graph: Graph, name: str, symbols: dict) -> relax.Var:
    t = graph.types[name]
    if t.shape is None:
        raise KilnError(f"graph input {name} has unknown rank")
    try:
        shape = [to_prim(d, symbols) for d in t.shape]
    except KeyError as e:
        raise KilnError(f"graph input {name}: symbolic dim {e} is not one of "
                        f"{BATCH}, {SEQ}, {PAST}") from e
    return relax.Var(name, relax.TensorType(shape, t.dtype.value))
