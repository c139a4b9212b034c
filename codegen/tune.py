"""`kiln tune`, build side: a model's kernel instances and their candidate schedules, compiled
ahead of time into a tuning plan that kiln.runtime.tune measures (here, or on a GPU host).

The model graph is lowered as `kiln compile` lowers it, with a recording `Schedules`: every
kernel instance (kernel family, shape dict) the lowerings asked a config for. For each, the
space's valid configs (the default first, at most `max_candidates`) are built alone by
`Space.build` and compiled into one library per instance through the target's own toolchain
(kiln.codegen.build.compile_kernels). The plan (plan.json, beside lib/ and args/) says per
instance which function is which config, the argument shapes and dtypes with every dynamic dim
bound, which arguments are outputs, and how closely a candidate must match the default.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tvm import sym, tirx
from tvm.tirx.analysis import undefined_vars

from kiln.codegen.build import build_module, compile_kernels
from kiln.codegen.schedules import Choice, Config, Schedules, Space, space, target_key
from kiln.codegen.targets import KilnTarget
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Graph

PLAN = "plan.json"
PLAN_FORMAT = 1
MAX_CANDIDATES = 12
#: largest relative error (max |candidate - default| / max |default|) of a candidate's output
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}


def instances(graph: Graph, target: KilnTarget,
              prefill_rows: int | Sequence[int]) -> list[Choice]:
    """Every kernel instance `kiln compile` would schedule for `graph` with prefill entries
    at each of `prefill_rows` (nothing compiled)."""
    schedules = Schedules(target)
    build_module(graph, target, schedules=schedules, prefill_rows=prefill_rows)
    return schedules.instances()


def candidates(sp: Space, shape: dict, target, cap: int | None = None) -> list[Config]:
    """The default and valid configs, at most `cap` (None: the space's own cap, else
    MAX_CANDIDATES): evenly spread over the rest if more."""
    configs = sp.configs(shape, target)
    cap = cap or sp.max_candidates or MAX_CANDIDATES
    if len(configs) <= cap:
        return configs
    rest, step = configs[1:], (len(configs) - 1) / (cap - 1)
    return [configs[0]] + [rest[int(i * step)] for i in range(cap - 1)]


def write_plan(found: list[Choice], target: KilnTarget, out: Path, *,
               skip: Collection[tuple[str, str]] = (), max_candidates: int | None = None,
               deadline: float | None = None,
               progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Compile the candidates of every instance not in `skip` ((kernel, bucket) pairs already
    measured) into `out`/lib and write `out`/plan.json; stops adding instances at `deadline`
    (time.monotonic())."""
    (out / "lib").mkdir(parents=True, exist_ok=True)
    plan = {"format": PLAN_FORMAT, "target": target_key(target), "kind": target.kind,
            "instances": []}
    todo = [c for c in found if space(c.kernel).build is not None and
            (c.kernel, c.shape) not in skip]
    for i, inst in enumerate(todo):
        if deadline is not None and time.monotonic() > deadline:
            progress(f"budget spent: {len(todo) - i} kernel instances left unbuilt")
            break
        entry = _build_instance(inst, target, out, len(plan["instances"]), max_candidates)
        if entry is not None:
            plan["instances"].append(entry)
            progress(f"[{i + 1}/{len(todo)}] built {len(entry['candidates'])} candidates of "
                     f"{inst.kernel} {inst.shape}")
    (out / PLAN).write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def _build_instance(inst: Choice, target, out: Path, index: int,
                    cap: int | None) -> dict[str, Any] | None:
    sp = space(inst.kernel)
    funcs, configs = {}, []
    for j, config in enumerate(candidates(sp, inst.dims, target, cap)):
        f = sp.build(inst.dims, config, target)
        if f is None:  # this instance's op has no standalone kernel: not measured
            return None
        funcs[f"k{index}_c{j}"] = f
        configs.append(config)
    dims = sp.dims(inst.dims)
    specs = [arg_specs(f, dims) for f in funcs.values()]
    if any(s != specs[0] for s in specs):
        raise KilnError(f"{inst.kernel} {inst.shape}: candidates take different arguments")
    lib = f"lib/k{index}.so"
    compile_kernels(funcs, target, out / lib)
    entry = {"kernel": inst.kernel, "bucket": inst.shape, "shape": inst.dims, "lib": lib,
             "candidates": [{"func": name, "config": c}
                            for name, c in zip(funcs, configs, strict=True)],
             "args": specs[0], "outputs": sp.outputs,
             # a token step reads each weight from memory once (the flush wants tensors only)
             "cold": inst.dims.get("phase") == "decode" and all("shape" in a for a in specs[0]),
             "tolerance": TOLERANCE.get(specs[0][-1]["dtype"], 1e-4), "args_file": None}
    _add_args(entry, sp, inst.dims, out, f"k{index}", index)
    # the same kernels at the space's other shapes (another cached length): measured there too
    probes = sp.probes(inst.dims) if sp.probes is not None else []
    entry["probes"] = []
    for j, shape in enumerate(probes):
        probe = {"shape": dict(shape), "args": arg_specs(next(iter(funcs.values())),
                                                         sp.dims(shape)), "args_file": None}
        _add_args(probe, sp, shape, out, f"k{index}_p{j}", index)
        entry["probes"].append(probe)
    return entry


def _add_args(entry: dict, sp: Space, shape: dict, out: Path, name: str, seed: int) -> None:
    """Write the arguments of `shape` when random values of each dtype would not do (sparse
    metadata, a cached length): `entry`'s args_file."""
    if sp.make_args is not None:
        (out / "args").mkdir(exist_ok=True)
        entry["args_file"] = f"args/{name}.npz"
        np.savez(out / entry["args_file"], *sp.make_args(shape, np.random.default_rng(seed)))


def arg_specs(func: tirx.PrimFunc, dims: dict[str, int]) -> list[dict[str, Any]]:
    """Each param of `func`: {"shape", "dtype"} of a buffer with its symbolic dims bound by
    name from `dims`, or {"scalar", "dtype"} of a scalar param."""
    specs = []
    for p in func.params:  # buffer params are Vars of BufferType; scalars of PrimType
        if isinstance(p.ty, tirx.buffer.BufferType):
            specs.append({"shape": [_bound(d, dims) for d in p.shape], "dtype": str(p.dtype)})
        else:
            specs.append({"scalar": _value(p, dims), "dtype": str(p.ty.dtype)})
    return specs


def _bound(dim, dims: dict[str, int]) -> int:
    ana = sym.Analyzer()
    for v in undefined_vars(dim):
        ana.bind(v, tirx.const(_value(v, dims), str(v.ty.dtype)))
    out = ana.simplify(dim)
    if not isinstance(out, tirx.IntImm):
        raise KilnError(f"kernel dim {dim} does not bind to a number with {dims}")
    return int(out.value)


def _value(var, dims: dict[str, int]) -> int:
    if var.name not in dims:
        raise KilnError(f"kernel param or dim {var.name}: no value in {sorted(dims)}")
    return int(dims[var.name])
