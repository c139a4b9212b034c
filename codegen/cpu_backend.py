"""The CPU (LLVM) backend: kiln's CPU lowering table and TVM's default pipeline, with every
kernel marked noalias."""

from __future__ import annotations

from kiln.codegen import lower  # its table is filled by build.py's imports
from kiln.codegen.backend import Backend


def compile_module(mod: object, target):
    """tvm.compile: kiln's kernels are already scheduled, the default pipeline lowers to the VM."""
    import tvm

    pipeline = tvm.transform.Sequential([tvm.relax.get_pipeline("default"), mark_noalias()])
    with target.tvm_target():
        return tvm.compile(mod, target=target.tvm_target(), relax_pipeline=pipeline)


def compile_kernels(mod: object, target):
    """Standalone kernels (`kiln tune`'s candidates), marked noalias as in a model's module."""
    import tvm

    with target.tvm_target():
        return tvm.compile(mark_noalias()(mod), target=target.tvm_target())


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


BACKEND = Backend(context=lower.LowerContext, lower_node=lower.lower_node,
                  last_position=lower.last_position, compile=compile_module,
                  compile_kernels=compile_kernels, compiler="LLVM")
