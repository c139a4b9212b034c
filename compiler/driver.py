"""The driver: model file -> frontend -> canonicalization pipeline (-> codegen -> artifact)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.ir import Graph
from kiln.passes import PassContext, run_pipeline


@dataclass(frozen=True)
class Canonicalized:
    original: Graph  # as imported (ONNX-level ops)
    canonical: Graph  # after the canonicalize pipeline
    timings: tuple[tuple[str, float, int], ...]  # (pass, seconds, nodes after)


def load_model(path: str | Path, *, weights_optional: bool = False) -> Graph:
    from kiln.compiler.frontend.onnx import load_onnx

    return load_onnx(path, weights_optional=weights_optional)


def canonicalize(path: str | Path, *, pipeline: str = "canonicalize",
                 dump_ir: Path | None = None, verify: bool = True,
                 weights_optional: bool = False,
                 on_pass: Callable[[str, Graph, float], None] | None = None,
                 options: dict[str, dict] | None = None) -> Canonicalized:
    """Import a model and run a pipeline on it (`options[pass]`: that pass's keywords)."""
    original = load_model(path, weights_optional=weights_optional)
    ctx = PassContext(verify=verify, dump_dir=dump_ir, on_pass=on_pass)
    canonical = run_pipeline(original, pipeline, ctx, **(options or {}))
    return Canonicalized(original, canonical, tuple(ctx.timings))
