"""`kiln tune MODEL`: measure every kernel instance's schedule candidates (docs/tuning.md).

Build (kiln.codegen.tune): the model lowered as `kiln compile` lowers it, its kernel instances
collected and each one's candidates compiled into a tuning plan. Measure
(kiln.runtime.tune): here for the CPU, or on the GPU host from a tuning bundle
(`--bundle DIR`, then `python DIR/kiln_run.py tune -o TUNING.json` there).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kiln.compiler.errors import KilnError

Progress = Callable[[str], None]


def tune_model(model: str | Path, out: str | Path | None = None, *, target: str = "cpu",
               bundle: str | Path | None = None, budget_s: float | None = None,
               threads: int | None = None, max_seq: int = 512, quant: str | None = None,
               sparsity: str | None = None,
               max_candidates: int | None = None, repeat: int = 7,
               rows: tuple[int, ...] | None = None, only: tuple[str, ...] | None = None,
               python: str | None = None, progress: Progress = lambda msg: None) -> Path:
    """Tune MODEL's kernels for `target` into the database `out` (resumed when it exists), or
    write a tuning bundle to `bundle` for measuring elsewhere; returns the path written.
    Prefill kernels are measured at each prompt length of `rows` (default
    kiln.compiler.compile.tune_rows); `kiln compile --tuning` emits prefill entries per length.
    `only`: the kernel families to tune (the others are not measured). `sparsity`: the
    linears pruned to that level by magnitude first, as `kiln compile --sparsity` would (its
    sparse kernels' shapes depend on the level only)."""
    if (out is None) == (bundle is None):
        raise KilnError("kiln tune: give -o TUNING.json (measure here) or --bundle DIR")
    if rows is not None and any(r < 1 or r > max_seq for r in rows):  # before the work
        raise KilnError(f"--rows {','.join(map(str, rows))}: prompt lengths must be within "
                        f"1..{max_seq} (--max-seq)")
    start = time.monotonic()
    deadline = None if budget_s is None else start + budget_s
    if threads or not target.startswith("cuda"):
        from kiln.runtime.tvm_runtime import size_thread_pool

        size_thread_pool(threads)  # before TVM's pool starts (its own default is half the CPUs)
    progress("loading TVM")
    from kiln.codegen import tune as build_side
    from kiln.compiler.compile import _preset, compile_graph, tune_rows
    from kiln.passes.prune_weights import parse_config

    tgt = _target(target, threads)
    if bundle is None and tgt.kind != "cpu":
        raise KilnError(f"target {tgt.name}: this host cannot run its kernels; write a tuning "
                        "bundle (--bundle DIR) and measure it on the GPU host")
    graph = compile_graph(Path(model), max_seq=max_seq, progress=progress,
                          weights_optional=True, quant=_preset(quant, (), tgt),
                          prune=parse_config(sparsity, "magnitude" if sparsity else None, ()),
                          pack_block=tgt.pack_block, sparse_target=tgt.sparse_target(),
                          fusions=tgt.fusions)  # the kernels `kiln compile` builds by default
    progress("collecting kernel instances")
    found = build_side.instances(graph, tgt, tune_rows(max_seq) if rows is None else rows)
    if only is not None:
        found = _only(found, only, tgt)
    cap = max_candidates  # None: each space's own cap (kiln.codegen.tune.candidates)
    if bundle is not None:
        from kiln.compiler.package import package_tuning

        with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
            build_side.write_plan(found, tgt, Path(tmp), max_candidates=cap, progress=progress)
            return package_tuning(Path(tmp), Path(bundle), cuda=tgt.kind == "cuda",
                                  progress=progress, **({"python": python} if python else {}))
    done = _measured(Path(out), tgt)
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as tmp:
        build_side.write_plan(found, tgt, Path(tmp), skip=done, max_candidates=cap,
                              deadline=deadline, progress=progress)
        from kiln.runtime.tune import measure

        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        measure(tmp, out, budget_s=left, repeat=repeat, threads=threads, progress=progress)
    return Path(out)


def _only(found: list, kernels: tuple[str, ...], tgt) -> list:
    """The instances of `kernels`; a name that is no schedule space of the target, or none of
    whose instances the model has, is an error (a typo would tune nothing)."""
    from kiln.codegen.schedules import SPACES

    known = sorted(k for k in SPACES if k.startswith(f"{tgt.kind}."))
    for k in kernels:
        if k not in known:
            raise KilnError(f"--only {k}: no such kernel family for {tgt.kind} "
                            f"(known: {', '.join(known)})")
        if not any(c.kernel == k for c in found):
            raise KilnError(f"--only {k}: the model has no {k} kernel to tune")
    return [c for c in found if c.kernel in kernels]


def _target(name: str, threads: int | None):
    from kiln.codegen.targets import host_cpu, resolve

    if name == "cpu":
        return host_cpu(threads)
    return resolve(name)


def _measured(out: Path, tgt) -> set[tuple[str, str]]:
    """(kernel, bucket) pairs `out` already holds for `tgt` (a resumed tuning skips them)."""
    if not out.exists():
        return set()
    from kiln.codegen.schedules import TuningDB, target_key

    db = TuningDB.load(out)
    if db.target != target_key(tgt):
        raise KilnError(f"{out}: measured for another target ({db.target}); write to another "
                        "file")
    return {(k, b) for k, buckets in db.entries.items() for b in buckets}
