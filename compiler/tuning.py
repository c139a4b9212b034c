"""`kiln tune MODEL`: the weight shapes of a compiled model, timed by kiln.codegen.tune."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from kiln.compiler.errors import KilnError


def tune_model(model: Path, out: Path, *, prompt_len: int = 128, repeat: int = 5,
               threads: int | None = None,
               progress: Callable[[str], None] = lambda msg: None) -> dict:
    """Tune the packed linear kernels for every (N, K) of MODEL's fp32 linears; writes `out`."""
    from kiln.runtime.tvm_runtime import size_thread_pool

    size_thread_pool(threads)  # before TVM's pool starts (its own default is half the CPUs)
    from kiln.codegen import tune
    from kiln.codegen.targets import host_cpu
    from kiln.compiler.compile import compile_graph

    target = host_cpu(threads)
    block = target.lanes(4)
    graph = compile_graph(Path(model), max_seq=prompt_len, progress=progress,
                          weights_optional=True, pack_block=block)
    shapes = set()
    for n in graph.nodes:
        if n.op == "linear" and n.attrs.get("packed"):
            nb, k, lanes = graph.types[n.inputs[1]].shape
            shapes.add((int(nb) * int(lanes), int(k)))
    if not shapes:
        raise KilnError(f"{model}: no packed fp32 linear to tune")
    trials = tune.tune(shapes, target, m=prompt_len, repeat=repeat, progress=progress)
    table = tune.best(trials)
    tune.save(Path(out), table, target, m=prompt_len, threads=target.threads)
    return table
