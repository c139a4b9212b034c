"""What codegen/build.py asks of a target's backend: its lowering table and context, the
adjustments of the calling convention, entry-point attributes, extra outputs, and how the
module is compiled and checked once exported. One `Backend` per target (Target.backend())."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _same(graph, target, sig):
    return sig


@dataclass(frozen=True, slots=True)
class Backend:
    """A target's code generation hooks; the defaults are those of a plain host target."""

    context: type  # a kiln.codegen.lower.LowerContext (sub)class
    lower_node: Callable  # (ctx, node) -> None: emit one node (its lowering table)
    last_position: Callable  # (ctx, x[b, s, e]) -> x[b, s-1:s, e]
    compile: Callable  # (IRModule, target) -> executable with export_library
    #: (IRModule of PrimFuncs, target) -> a library of standalone kernels (`kiln tune`'s)
    compile_kernels: Callable
    compiler: str  # the compiler it runs, for progress lines ("LLVM", "nvcc")
    #: (graph, target, sig) -> sig: the calling convention adjusted (cache dtype, inputs)
    signature: Callable = _same
    #: (target, entry, number of inputs) -> the Relax function's attributes (None: none)
    entry_attrs: Callable[[Any, str, int], dict | None] = lambda target, entry, n: None
    #: (ctx, graph, sig, batch, seq) -> {graph input: expr} for inputs the signature dropped
    computed_inputs: Callable[..., dict] = lambda ctx, graph, sig, batch, seq: {}
    #: (ctx, entry, outputs) -> extra expressions the entry point also returns
    extra_outputs: Callable[..., list] = lambda ctx, entry, outs: []
    #: target -> how many per-row offsets of past the entry points take after it (batches
    #: of rows of unequal lengths; 0: none, every row has `past` tokens)
    row_offsets: Callable[[Any], int] = lambda target: 0
    #: (graph, target) -> the cached lengths decode entries are scheduled for (the first:
    #: `decode`, each other c: `decode_<c>`, which the runtime runs for contexts nearer c);
    #: (): one decode entry
    decode_contexts: Callable[[Any, Any], tuple[int, ...]] = lambda graph, target: ()
    #: (path, target) -> None: check the exported library (raises KilnError)
    check_export: Callable[[Any, Any], None] = lambda path, target: None
