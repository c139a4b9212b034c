"""The reference: run an ONNX model with ONNX Runtime (CPU), and list its inputs and outputs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError


@dataclass(frozen=True)
class IOInfo:
    """One model input or output as ONNX Runtime sees it: dims are ints, names or None."""

    name: str
    dtype: str  # onnxruntime's type string, e.g. "tensor(float)"
    dims: tuple[int | str | None, ...]


def _session(path: str | Path, threads: int | None, optimize: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"{path}: onnxruntime cannot load the model: {first}") from e


def run_onnxruntime(path: str | Path, feeds: Mapping[str, np.ndarray], *,
                    threads: int | None = None, optimize: bool = True) -> dict[str, np.ndarray]:
    """All outputs of the model at `path` on `feeds`, by output name (the reference for checks)."""
    sess = _session(path, threads, optimize)
    wanted = {i.name for i in sess.get_inputs()}
    missing = sorted(wanted - set(feeds))
    if missing:
        raise KilnError(f"{path}: onnxruntime run is missing inputs {missing}")
    names = [o.name for o in sess.get_outputs()]
    try:
        outs = sess.run(names, {k: np.asarray(v) for k, v in feeds.items() if k in wanted})
    except Exception as e:  # onnxruntime's own exception types, raised by a node at run time
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"{path}: onnxruntime cannot run the model on the seeded inputs: "
                        f"{first}") from e
    return dict(zip(names, outs, strict=True))


def model_io(path: str | Path) -> tuple[list[IOInfo], list[IOInfo]]:
    """The model's inputs and outputs with their declared dims (names for symbolic dims)."""
    sess = _session(path, 1, optimize=False)

    def info(args) -> list[IOInfo]:
        return [IOInfo(a.name, a.type, tuple(a.shape)) for a in args]

    return info(sess.get_inputs()), info(sess.get_outputs())
