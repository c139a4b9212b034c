"""Graph passes: one pure `Graph -> Graph` function per file, a registry and named pipelines.

A pass takes the graph and keyword-only options and returns a new graph; it never mutates its
input. Verification and IR dumps between passes are the PassContext's business, not the passes'.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kiln.compiler.ir import Graph

Pass = Callable[..., Graph]
PASSES: dict[str, Pass] = {}

#: named pipelines: lists of pass names, run in order
PIPELINES: dict[str, list[str]] = {
    "canonicalize": [
        "infer_shapes", "fold_constants", "eliminate_common_subexpressions",
        "eliminate_dead_code", "recognize_linear", "recognize_norms", "recognize_activations",
        "recognize_rotary", "eliminate_dead_code", "recognize_attention", "eliminate_dead_code",
        "fuse_projections", "eliminate_common_subexpressions", "eliminate_dead_code",
    ],
}
#: the weight and cache transforms after canonicalization, in order; each does nothing unless its
#: options ask for it (kiln.compiler.compile.compile_graph passes them), so a stage is one name here
PIPELINES["quantize"] = ["prune_weights", "quantize_kv_cache", "quantize_weights", "sparsify",
                         "pack_linear_weights"]
#: the fusion passes that only record groups (kiln.passes.fusion), on the final graph; each does
#: nothing unless its options enable it (the target's fusions, less `--no-fuse`)
PIPELINES["fuse"] = ["fuse_norm_linear", "fuse_residual_add", "fuse_qkv_rope",
                     "fuse_qkv_projection", "fuse_swiglu"]
#: what `kiln compile` runs: the canonical graph, specialized to a context of max_positions, then
#: quantized and laid out for the target's kernels, then its fusion groups recorded
PIPELINES["compile"] = [*PIPELINES["canonicalize"], "tabulate_positions", "eliminate_dead_code",
                        *PIPELINES["quantize"], *PIPELINES["fuse"]]

#: modules that register passes (one pass per file)
_PASS_MODULES = [
    "infer_shapes", "fold_constants", "eliminate_common_subexpressions", "eliminate_dead_code",
    "recognize_linear", "recognize_norms", "recognize_activations", "recognize_rotary",
    "recognize_attention", "fuse_projections", "tabulate_positions", "pack_linear_weights",
    "quantize_kv_cache", "quantize", "prune_weights", "sparsify", *PIPELINES["fuse"],
]


def register(name: str) -> Callable[[Pass], Pass]:
    def deco(fn: Pass) -> Pass:
        PASSES[name] = fn
        return fn

    return deco


@dataclass
class PassContext:
    """What happens between passes: verification, IR dumps, timing and progress reports."""

    verify: bool = True
    dump_dir: Path | None = None
    disabled: frozenset[str] = frozenset()
    on_pass: Callable[[str, Graph, float], None] | None = None  # progress callback
    timings: list[tuple[str, float, int]] = field(default_factory=list)


def get_pass(name: str) -> Pass:
    if name not in PASSES:
        _load(name)
    if name not in PASSES:
        from kiln.compiler.errors import KilnError

        raise KilnError(f"unknown pass {name!r}; known: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def run_pipeline(graph: Graph, pipeline: str | Sequence[str], ctx: PassContext | None = None,
                 **options) -> Graph:
    """Run a named pipeline (or a list of pass names); `options[pass_name]` are its kwargs."""
    from kiln.compiler.verify import verify

    ctx = ctx or PassContext()
    names = PIPELINES[pipeline] if isinstance(pipeline, str) else list(pipeline)
    if ctx.dump_dir is not None:
        ctx.dump_dir.mkdir(parents=True, exist_ok=True)
        (ctx.dump_dir / "00_input.txt").write_text(graph.dump())
    for i, name in enumerate(names, 1):
        if name in ctx.disabled:
            continue
        start = time.perf_counter()
        graph = get_pass(name)(graph, **options.get(name, {}))
        elapsed = time.perf_counter() - start
        ctx.timings.append((name, elapsed, len(graph.nodes)))
        if ctx.verify:
            verify(graph)
        if ctx.dump_dir is not None:
            (ctx.dump_dir / f"{i:02d}_{name}.txt").write_text(graph.dump())
        if ctx.on_pass is not None:
            ctx.on_pass(name, graph, elapsed)
    return graph


def _load(name: str) -> None:
    if name in _PASS_MODULES:
        importlib.import_module(f"kiln.passes.{name}")
    else:
        for mod in _PASS_MODULES:
            importlib.import_module(f"kiln.passes.{mod}")
