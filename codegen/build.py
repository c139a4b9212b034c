"""Build a Relax IRModule with `prefill` and `decode` entry points from a canonical kiln graph.

Entry-point signature (both), in this order:
    past: R.Shape([past, (offsets)])           tokens already in the KV cache; where the target's
                                               backend takes row offsets (CUDA), row i holds
                                               past + offset_i (batches of unequal lengths)
    <graph inputs>                             except past_k/past_v, in graph order; in decode
                                               the `seq` symbol is 1
    kv_cache: R.Tuple(k_0, v_0, k_1, v_1 ...)  each (batch, kv_heads, capacity, head_dim),
                                               written in place at rows past..past+seq-1
    params: R.Tuple(...)                       graph parameters, in `ModuleSignature.params` order
and returns the graph outputs except the present_k/v ones (a tuple when there are several).
`prefill_last` is `prefill` whose output linear (the LM head) runs on the last position of each
row only: logits (batch, 1, vocab), all a generation loop needs, at a fraction of the work.

Prefill kernels are scheduled for a number of rows (the prompt length a tuning measured). Where
a tuning database holds winners for several row buckets, the prefill entry points are emitted
once per bucket: `prefill`/`prefill_last` for the first, `prefill_<rows>`/`prefill_last_<rows>`
for the others (same signature, other kernels); the runtime picks by the prompt's length
(kiln.runtime.session.row_entry).
"""

from __future__ import annotations

import dataclasses
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
    scale_cache,
    to_prim,
)
from kiln.codegen.schedules import Schedules
from kiln.codegen.targets import KilnTarget
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import BATCH, PAST, SEQ, Graph

ENTRY_POINTS = ("prefill", "decode", "prefill_last")
#: the phase each entry point's kernel instances are scheduled for
#: ctx.symbols key prefix of the per-row offsets of past (Backend.row_offsets)
ROW_OFFSET = "row_offset_"
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
    #: rows the prefill entries are scheduled for: the plain entries' first, then one entry
    #: per extra bucket (kiln.runtime.session.row_entry)
    prefill_rows: tuple[int, ...] = (512,)
    #: cached lengths the decode entries are scheduled for, likewise (empty: one decode)
    decode_past: tuple[int, ...] = ()




def build_module(graph: Graph, target: KilnTarget, *,
                 entry_points: Sequence[str] = ENTRY_POINTS,
                 schedules: Schedules | None = None,
                 prefill_rows: int | Sequence[int] = 512) -> tuple[object, ModuleSignature]:
    """The Relax IRModule (kernels included) and its calling convention. `schedules` answers
    the lowerings' config questions (a tuning database, else the cost model) and keeps what
    each kernel instance got, for the manifest; prefill kernel instances are looked up at
    `prefill_rows` rows (the prompt lengths they are tuned for: with several, the prefill
    entry points are emitted once per row bucket)."""
    backend = target.backend()
    rows = (prefill_rows,) if isinstance(prefill_rows, int) else tuple(prefill_rows)
    sig = backend.signature(graph, target, signature(graph, entry_points))
    pasts = tuple(backend.decode_contexts(graph, target)) if "decode" in sig.entry_points \
        else ()
    # (entry, name, prefill rows, decode's cached length: 0 for the backend's own)
    emit = [(e, e, rows[0], pasts[0] if pasts and e == "decode" else 0)
            for e in sig.entry_points]
    emit += [(e, f"{e}_{r}", r, 0) for r in rows[1:] for e in sig.entry_points
             if _PHASE[e] == "prefill"]
    emit += [("decode", f"decode_{p}", rows[0], p) for p in pasts[1:]]
    sig = dataclasses.replace(sig, entry_points=tuple(e[1] for e in emit),
                              prefill_rows=rows, decode_past=pasts)
    bb = relax.BlockBuilder()
    kernels: dict = {}
    schedules = schedules if schedules is not None else Schedules(target)
    for entry, name, r, p in emit:
        _emit_entry(bb, graph, target, sig, entry, kernels, schedules, r, name=name,
                    decode_past=p)
    return bb.get(), sig


def compile_module(mod: object, target: KilnTarget):
    """The target backend's compile (kiln's kernels are already scheduled; TVM's pipeline
    lowers the rest to the VM)."""
    return target.backend().compile(mod, target)


def compile_kernels(funcs: dict[str, tirx.PrimFunc], target: KilnTarget,
                    path: str | os.PathLike) -> None:
    """Compile standalone kernels (`kiln tune`'s candidates) into one library at `path`, each
    exported under its name, through the target backend's toolchain as `build` does (CUDA:
    machine code for the arch, cross-compiled where no GPU exists)."""
    import tvm

    from kiln.codegen.kernels import with_root_block

    mod = tvm.IRModule({name: with_root_block(f).with_attr("global_symbol", name)
                        for name, f in funcs.items()})
    backend = target.backend()
    backend.compile_kernels(mod, target).export_library(os.fspath(path))
    backend.check_export(path, target)


def build(graph: Graph, target: KilnTarget, path: str | os.PathLike, *,
          progress: Callable[[str], None] = lambda msg: None, **kw) -> ModuleSignature:
    """Build, compile and export the shared library at `path`; returns its calling convention.
    `progress` hears of each step (the last two take most of a large model's compile)."""
    progress(f"generating kernels for {target.name}")
    mod, sig = build_module(graph, target, **kw)
    progress(f"compiling kernels for {target.name} ({target.backend().compiler})")
    executable = compile_module(mod, target)
    progress(f"linking {os.path.basename(path)}")
    executable.export_library(os.fspath(path))
    target.backend().check_export(path, target)
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
                prefill_rows: int, name: str | None = None, decode_past: int = 0) -> None:
    b, past, cap = (tirx.Var(n, "int64") for n in ("batch", "past", "capacity"))
    seq = tirx.const(1, "int64") if entry == "decode" else tirx.Var("seq", "int64")
    symbols = {BATCH: b, SEQ: seq, PAST: past}
    backend = target.backend()
    # past, then (targets batching rows of unequal lengths) each row's offset from it
    offsets = [tirx.Var(f"{ROW_OFFSET}{i}", "int64") for i in range(backend.row_offsets(target))]
    symbols.update({v.name: v for v in offsets})
    past_arg = relax.Var("past", relax.ShapeType([past, *offsets]))
    inputs = [_input_var(graph, v, symbols) for v in sig.inputs]
    cache_ty = [relax.TensorType([b, c.kv_heads, cap, c.head_dim], c.dtype) for c in sig.caches]
    caches = relax.Var("kv_cache", relax.TupleType(cache_ty))
    params = relax.Var("params", relax.TupleType(
        [relax.TensorType([int(d) for d in graph.params[p].type.shape],
                          _param_dtype(target, graph.params[p].type.dtype.value))
         for p in sig.params]))
    attrs = backend.entry_attrs(target, entry, 1 + len(inputs))
    lower, last = backend.lower_node, backend.last_position
    with bb.function(name or entry, [past_arg, *inputs, caches, params], attrs=attrs):
        with bb.dataflow():
            ctx = backend.context(bb, graph, target, _PHASE[entry], past, kernels=kernels,
                                  schedules=schedules, prefill_rows=prefill_rows,
                                  decode_past=decode_past)
            ctx.symbols.update(symbols)
            ctx.values.update(zip(sig.inputs, inputs, strict=True))
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
            outs += backend.extra_outputs(ctx, entry, outs)  # CUDA decode: greedy tokens
            result = bb.emit_output(outs[0] if len(outs) == 1 else relax.Tuple(outs))
        bb.emit_func_output(result)


def _param_dtype(target: KilnTarget, dtype: str) -> str:
    """Floating-point parameters are stored (and computed) in the target's storage dtype."""
    stored = target.storage_dtype()
    return stored if stored is not None and dtype in _FLOATS else dtype


_FLOATS = ("float16", "bfloat16", "float32", "float64")


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
