"""Programmatic dependent launch (Hopper, sm_90 and later) for the decode kernels.

A decode step is a chain of ~100 short kernels (six per layer); each one, started only when the
one before it has finished, pays its launch and the first trip to memory before its weights
stream. With PDL the next kernel is already resident when the current one gets going, and it
issues its weight loads, which depend on nothing computed, before it waits:

    ...load weights...   # never written by a kernel
    wait(pdl)            # griddepcontrol.wait: the previous kernel has completed and its
                         # writes are visible; then launch_dependents: the next kernel may
                         # start as soon as every block of this one is past this point
    ...read activations, compute, write...

Every kernel in the chain waits, so the order is transitive; a kernel without these calls is
launched the ordinary way. Two rules keep it correct:
- No `tirx.noalias` on the device functions of these kernels (`tag_launches` clears the one
  the host/device split gives every device function). With it every pointer is `__restrict__`,
  and nvcc reads a restrict pointer the kernel never writes through the non-coherent path
  (ld.global.nc), which assumes the data does not change while the kernel runs; under PDL the
  activations are written by the previous kernel while this one is already running. On the
  H200 greedy decoding went wrong after a few steps that way (runs 11-12 in
  benchmarks/gpu/cuda_llm_log.md).
- The trigger comes after the wait, not at the start: triggered at the start, a whole chain of
  waiting kernels would become resident at once and hold the SMs' slots; after it, at most two
  kernels overlap: the running one and the next, which reads nothing but weights until its own
  wait.

The launch must carry the attribute too (CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
kept by CUDA-graph capture). TVM's CUDA runtime sets it for kernels whose launch-parameter tags
include `tirx.use_programtic_dependent_launch` (TVM's spelling); `tag_launches`, run after the
host/device split by the `kiln_cuda` TIR pipeline, adds the tag to exactly the device functions
that call griddepcontrol.
"""

from __future__ import annotations

import tvm
from tvm import tirx
from tvm.script import tirx as T

#: kernels are built with PDL where the arch has it; the benchmarks' `nopdl` variant clears this
ENABLED = True
PIPELINE = "kiln_cuda"
TAG = "tirx.use_programtic_dependent_launch"
_LAUNCH_PARAMS = "tirx.kernel_launch_params"
_DYN_SHARED = "tirx.use_dyn_shared_memory"  # must stay the last tag
_NOALIAS = "tirx.noalias"


def supported(arch: str) -> bool:
    """Whether kernels for `arch` ("sm_90", "sm_90a", ...) may use griddepcontrol."""
    return ENABLED and int(arch[3:].rstrip("a")) >= 90


@T.macro
def wait(on):
    """Wait for the previous kernel, then let the next one start (nothing when `on` is false)."""
    if on:
        T.ptx.griddepcontrol.wait()
        T.ptx.griddepcontrol.launch_dependents()


@tvm.transform.module_pass(opt_level=0, name="kiln.TagProgrammaticLaunch")
def tag_launches(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Add the PDL launch tag to the device kernels that call griddepcontrol, and clear their
    `tirx.noalias` (no `__restrict__`, so no non-coherent loads of activations)."""
    updates = {}
    for gv, f in mod.functions.items():
        if not isinstance(f, tirx.PrimFunc) or f.attrs is None or _LAUNCH_PARAMS not in f.attrs:
            continue
        tags = [str(t) for t in f.attrs[_LAUNCH_PARAMS]]
        if TAG in tags or "griddepcontrol" not in f.script(show_meta=False):
            continue
        at = tags.index(_DYN_SHARED) if _DYN_SHARED in tags else len(tags)
        # the host/device split marks every device function noalias: undone (see above)
        updates[gv] = f.with_attr(_LAUNCH_PARAMS, [*tags[:at], TAG, *tags[at:]]).with_attr(
            _NOALIAS, False)
    for gv, f in updates.items():
        mod[gv] = f
    return mod


def _pipeline():
    from tvm.s_tir import pipeline

    lower, finalize_host, finalize_device = pipeline.default_s_tir_pipeline()
    return lower, finalize_host, lambda: tvm.transform.Sequential([finalize_device(),
                                                                    tag_launches])


tirx.compilation_pipeline.PIPELINE_MAP.setdefault(PIPELINE, _pipeline)
