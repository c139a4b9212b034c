"""`kiln tune`, measuring side: time a tuning plan's candidates with the TVM runtime alone and
write the tuning database (docs/tuning.md). Runs where the kernels run: this host for the CPU,
the GPU host for a CUDA tuning bundle (`python BUNDLE/kiln_run.py tune -o TUNING.json`).

Per kernel instance: seeded random arguments of the plan's shapes and dtypes (or the plan's own,
args/), the default candidate run first, every other candidate's outputs checked against the
default's (relative error within the plan's tolerance; NaN fails) before its time counts, then
timed with the runtime's time_evaluator: the median of `repeat` repeats. Where the plan gives
an instance probes (the same kernels at other values of its run-time dims: a decode entry's
span of cached lengths), every candidate is checked and timed at each of them too. Decode
instances run cold, as in a token step, where each weight comes from memory once: on the CPU
the caches are flushed of every argument but the first (the activations) before each run, on
a GPU its L2 is overwritten. The database is written after each instance; instances already
in it are skipped (resumable); no new instance starts once the budget is spent.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.runtime import tuning_file
from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

PLAN = "plan.json"
#: a candidate replaces the default only when this much faster (timing noise is a few %)
MIN_GAIN = 0.03
#: nor when it is more than this much slower than the default at one of the instance's probes
NOISE = 0.02
#: bytes a GPU's L2 is overwritten with before each cold run (H100/H200: 50 MB of L2)
GPU_FLUSH_BYTES = 256 << 20


def measure(plan_dir: str | os.PathLike, out: str | os.PathLike, *,
            budget_s: float | None = None, repeat: int = 7, threads: int | None = None,
            progress: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Measure the plan in `plan_dir`, adding to the database `out` (created, or resumed when
    it holds this plan's target); returns the database's entries."""
    start = time.monotonic()
    plan_dir, out = Path(plan_dir), Path(out)
    plan = json.loads((plan_dir / PLAN).read_text())
    target, entries = plan["target"], {}
    if out.exists():
        have, entries = tuning_file.read(out)
        if have != target:
            raise KilnError(f"{out}: measured for another target ({have}), this plan is for "
                            f"{target}: write to another file")
    tvm = import_tvm(threads)
    dev = tvm.cuda(0) if plan["kind"] == "cuda" else tvm.cpu(0)
    if plan["kind"] == "cuda":
        load_cuda_runtime(tvm)
    todo = [i for i in plan["instances"] if i["bucket"] not in entries.get(i["kernel"], {})]
    progress(f"{len(plan['instances']) - len(todo)} kernel instances already measured, "
             f"{len(todo)} to go")
    for n, inst in enumerate(todo):
        if budget_s is not None and time.monotonic() - start > budget_s:
            progress(f"budget of {budget_s:g} s spent: {len(todo) - n} instances left "
                     "(run again to resume)")
            break
        result = _instance(tvm, dev, plan_dir, inst, repeat, plan["kind"])
        entries.setdefault(inst["kernel"], {})[inst["bucket"]] = result
        tuning_file.write(out, target, entries)
        progress(f"[{n + 1}/{len(todo)}] {inst['kernel']} {inst['bucket']}: "
                 f"{_describe(result)}")
    return entries


def _describe(r: dict) -> str:
    gain = r["default_seconds"] / r["seconds"] if r["seconds"] else 1.0
    return (f"{r['config']} {r['seconds'] * 1e6:.1f} us, default {r['default_seconds'] * 1e6:.1f}"
            f" us ({gain:.2f}x; {r['checked']} of {r['candidates']} candidates checked)")


def _instance(tvm, dev, plan_dir: Path, inst: dict, repeat: int, kind: str) -> dict:
    """The fastest checked candidate of one instance: at its own arguments and, where the plan
    has probes (the same kernels at another cached length), at each probe's too. A candidate
    wins when its geometric mean of time over the default's is MIN_GAIN under 1 and it is no
    more than NOISE slower than the default at any of them."""
    lib = tvm.runtime.load_module(str(plan_dir / inst["lib"]))
    cands = inst["candidates"]
    ok = [True] * len(cands)
    rejected, times = [], []  # times[set][candidate] (None: not timed)
    for args_of in [inst, *inst.get("probes", [])]:
        args = _args(tvm, dev, plan_dir, args_of)
        live = [j for j in range(len(cands)) if ok[j]]  # the default (0) always
        errors = _check(tvm, dev, lib, [cands[j] for j in live], args, inst["outputs"])
        for j, err in zip(live[1:], errors[1:], strict=True):  # the default is the reference
            if not err <= inst["tolerance"]:
                ok[j] = False
                rejected.append((cands[j]["config"], err))
        times.append([_time(lib, c["func"], dev, args, repeat, inst["cold"], kind)
                      if ok[j] else None for j, c in enumerate(cands)])
    ratios = [math.prod(t[j] / t[0] for t in times) ** (1 / len(times)) if ok[j] else math.inf
              for j in range(len(cands))]
    fair = [j for j in range(len(cands)) if ok[j]
            and all(t[j] <= t[0] * (1 + NOISE) for t in times)]
    best = min(fair, key=lambda j: ratios[j])
    if ratios[best] > 1 - MIN_GAIN:
        best = 0
    result = {"config": cands[best]["config"], "seconds": times[0][best],
              "default_seconds": times[0][0], "candidates": len(cands), "checked": sum(ok),
              "rejected": [{"config": c, "error": float(e)} for c, e in rejected]}
    if len(times) > 1:  # the winner's speed-up over the default at each probe
        result["probes"] = [{"shape": p["shape"], "gain": t[0] / t[best]}
                            for p, t in zip(inst["probes"], times[1:], strict=True)]
    return result


def _check(tvm, dev, lib, cands: list[dict], args: list, outputs: int) -> list[float]:
    """Each candidate's largest relative error against the default candidate's outputs (0 for
    the default itself). A candidate must write its outputs, not inherit the default's: they
    are overwritten with NaN (zeros for integers) before it runs, from device copies made
    once."""
    outs = range(len(args) - outputs, len(args))
    lib[cands[0]["func"]](*args)
    want = [args[i].numpy() for i in outs]
    blanks = [tvm.runtime.tensor(np.full(w.shape, np.nan, w.dtype) if w.dtype.kind == "f"
                                 else np.zeros_like(w), dev) for w in want]
    errors = [0.0]
    for cand in cands[1:]:
        for i in outs:
            blanks[i - outs.start].copyto(args[i])
        lib[cand["func"]](*args)
        errors.append(_error(want, [args[i].numpy() for i in outs]))
    return errors


def _args(tvm, dev, plan_dir: Path, inst: dict) -> list:
    if inst["args_file"]:
        with np.load(plan_dir / inst["args_file"]) as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    else:
        rng = np.random.default_rng(0)
        arrays = [_random(rng, spec) for spec in inst["args"]]
    return [a if isinstance(a, int) else tvm.runtime.tensor(np.ascontiguousarray(a), dev)
            for a in arrays]


def _random(rng: np.random.Generator, spec: dict):
    if "scalar" in spec:
        return int(spec["scalar"])
    shape, dtype = spec["shape"], spec["dtype"]
    if dtype in ("int8", "uint8"):  # quantized weights, int8 caches: every code
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max + 1, shape, dtype=dtype)
    if dtype.startswith(("int", "uint", "bool")):  # masks, flags: all set
        return rng.integers(1, 3, shape).astype(dtype)
    if dtype == "bfloat16":
        raise KilnError("bfloat16 arguments need the space's make_args")
    return rng.standard_normal(shape).astype(dtype)


#: elements compared at a time (outputs reach a GB: a 2048-row LM head's logits)
ERROR_CHUNK = 1 << 22


def _error(want: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Largest |got - want| over the largest |want|, over all outputs (NaN if any is NaN).
    Computed a chunk at a time, so a GB-sized output costs no GB-sized copies; float16 and
    float32 outputs in float32 (what a tolerance of about 1e-3 needs), others in float64."""
    worst = 0.0
    for w, g in zip(want, got, strict=True):
        w, g = w.reshape(-1), g.reshape(-1)
        ct = np.float32 if w.dtype in (np.float16, np.float32) else np.float64
        scale, diff = 1e-30, 0.0
        for i in range(0, w.size, ERROR_CHUNK):
            wc = w[i:i + ERROR_CHUNK].astype(ct)
            d = np.abs(g[i:i + ERROR_CHUNK].astype(ct) - wc).max(initial=0.0)
            if np.isnan(d):  # NaN in got (or in want: no reference to check against)
                return float("nan")
            scale = max(scale, float(np.abs(wc).max(initial=0.0)))
            diff = max(diff, float(d))
        worst = max(worst, diff / scale)
    return worst


def _time(lib, func: str, dev, args: list, repeat: int, cold: bool, kind: str) -> float:
    if cold and kind == "cpu":  # number=1: the flush runs before every timed call
        f = lib.time_evaluator(func, dev, number=1, repeat=max(repeat, 15),
                               f_preproc="cache_flush_cpu_non_first_arg")
    elif cold:
        f = lib.time_evaluator(func, dev, number=1, repeat=max(repeat, 15),
                               cache_flush_bytes=GPU_FLUSH_BYTES)
    else:
        f = lib.time_evaluator(func, dev, number=1, repeat=repeat, min_repeat_ms=20)
    return float(statistics.median(f(*args).results))
