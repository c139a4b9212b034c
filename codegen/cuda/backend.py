"""What build.py needs to know about the CUDA target beyond the lowering table: parameter
dtypes, entry-point attributes for memory planning and CUDA-graph capture, and the compile call.

The decode step runs as a captured CUDA graph (Relax RewriteCUDAGraph): kernels whose arguments
are all static (parameters, KV cache, statically planned intermediates) are captured once and
replayed. For that, decode's intermediates are planned for `max_batch` rows (upper bound of the
batch symbol), and `num_input` marks the arguments after the inputs (KV cache, parameters) as
static. Kernels reading per-call inputs (token ids, positions, `past`) run outside the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kiln.codegen.targets import CudaTarget

USE_CUDA_GRAPH = "relax.backend.use_cuda_graph"
POSITIONS = "position_ids"
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def param_dtype(target: CudaTarget, dtype: str) -> str:
    """Floating-point parameters are stored (and computed) in the target's dtype."""
    return target.dtype if dtype in _FLOATS else dtype


def cuda_signature(graph, target: CudaTarget, sig):
    """The CPU calling convention, adjusted: the KV cache is stored in the compute dtype (an
    int8 one, kv8, keeps its int8 rows and float32 scales); an attention mask read by nothing
    but attention is no input (the CUDA attention kernels are causal over the cache, without
    padding; the runtime then neither builds nor copies it); nor are the position ids:
    without padding they are past, past + 1, ..., which `computed_inputs` computes on the
    device. A decode step then copies only the token ids to the device, and nothing when they
    are the previous step's greedy tokens, already there."""
    from kiln.codegen.lower import scale_cache

    users = graph.consumers()
    unused = {v for v in sig.inputs if users.get(v) and all(
        n.op == "attention" and list(n.inputs).index(v) == 5 for n in users[v])}
    unused |= {POSITIONS} & set(sig.inputs)
    scales = {scale_cache(c.name) for c in sig.caches if c.dtype == "int8"}
    return dataclasses.replace(
        sig, inputs=tuple(v for v in sig.inputs if v not in unused),
        caches=tuple(c if c.name in scales else dataclasses.replace(
            c, dtype=param_dtype(target, c.dtype)) for c in sig.caches))


def computed_inputs(ctx, graph, sig, batch, seq) -> dict:
    """Graph inputs the CUDA calling convention leaves out that the graph reads: the position
    ids, past + j for the j-th new token of every row (decode: that row's cached length + j),
    from the device copy of `past` (so the kernels reading them can be captured in the decode
    step's CUDA graph)."""
    if POSITIONS not in graph.inputs or POSITIONS in sig.inputs:
        return {}
    from tvm import te, tirx

    def positions(past):
        last = past.shape[0] - 1
        return te.compute((batch, seq), lambda i, j: past[tirx.min(i, last)].astype("int64") + j,
                          name="positions")

    lengths = ctx.row_lengths() if ctx.phase == "decode" else ctx.past_on_device()
    return {POSITIONS: ctx.bb.emit_te(positions, lengths)}


def greedy_tokens(ctx, logits):
    """argmax of the last axis of logits (batch, 1, vocab): (batch, 1) int64, on the device, so
    that a greedy decode step copies back one id per row instead of the logits."""
    from tvm import relax
    from tvm.relax import op as R

    from kiln.codegen.cuda.kernels.gemv import argmax_kernel
    from kiln.codegen.lower import dtype_of, shape_of

    b, _, v = shape_of(logits)
    vocab, dtype = int(v), dtype_of(logits)
    gv = ctx.kernel(("cuda_argmax", vocab, dtype, ctx.pdl),
                    lambda: argmax_kernel(vocab, dtype, pdl=ctx.pdl))
    flat = ctx.bb.emit(R.reshape(logits, [b, v]))
    ids = ctx.bb.emit(R.call_tir(gv, [flat], relax.TensorType([b], "int64")))
    return ctx.bb.emit(R.reshape(ids, [b, 1]))


def decode_tokens(ctx, entry: str, outs: list) -> list:
    """Decode also returns the greedy tokens, picked on the device."""
    return [greedy_tokens(ctx, outs[0])] if entry == "decode" else []


def entry_attrs(target: CudaTarget, entry: str, num_inputs: int) -> dict[str, Any]:
    attrs: dict[str, Any] = {"num_input": num_inputs}
    if entry == "decode":
        attrs["tir_var_upper_bound"] = {"batch": target.max_batch}
    return attrs


def compile_module(mod, target: CudaTarget):
    """tvm.compile with the default CUDA pipeline (dlight schedules, CUDA-graph rewriting) and
    TIR pipeline plus the launch tag of programmatic dependent launch (kernels/pdl.py), machine
    code for the target's arch (see cuda_toolchain)."""
    import tvm

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl

    with tvm.transform.PassContext(opt_level=3, config={USE_CUDA_GRAPH: True}):
        return ct.compile_for_cuda(mod, target.tvm_target(), tir_pipeline=pdl.PIPELINE)


def compile_kernels(mod, target: CudaTarget):
    """Standalone kernels (`kiln tune`'s candidates): machine code for the arch, no VM."""
    import tvm

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl

    with tvm.transform.PassContext(opt_level=3):
        return ct.compile_for_cuda(mod, target.tvm_target(), tir_pipeline=pdl.PIPELINE)


def _require_fatbin(path, target: CudaTarget) -> None:
    """Machine code for the target's arch, never CUDA source (see cuda_toolchain)."""
    from kiln.codegen.cuda_toolchain import require_fatbin

    require_fatbin(path, target.arch)


def _backend():
    from kiln.codegen.backend import Backend
    from kiln.codegen.cuda import lower, spaces

    return Backend(context=lower.CudaLowerContext, lower_node=lower.lower_node,
                   last_position=lower.last_position, compile=compile_module,
                   compile_kernels=compile_kernels, compiler="nvcc",
                   signature=cuda_signature, entry_attrs=entry_attrs,
                   computed_inputs=computed_inputs, extra_outputs=decode_tokens,
                   check_export=_require_fatbin,
                   row_offsets=lambda target: target.max_batch,
                   decode_contexts=spaces.decode_contexts)


BACKEND = _backend()
