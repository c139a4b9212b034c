"""`kiln check`: onnxruntime and kiln's interpreter on the same seeded inputs, output by output."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import Graph

#: the two settings every decoder is checked in: (name, seq, past)
CASES = (("prefill", 7, 0), ("decode", 1, 5))


@dataclass(frozen=True)
class OutputError:
    name: str
    max_abs: float
    rel: float  # max |kiln - ref| / max |ref|
    ok: bool


@dataclass
class CaseResult:
    case: str
    seq: int
    past: int
    outputs: list[OutputError] = field(default_factory=list)
    top1_agreement: float | None = None  # argmax of logits, kiln vs reference

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


def compare(actual: np.ndarray, expected: np.ndarray, name: str, tol: float) -> OutputError:
    a, e = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != e.shape:
        return OutputError(name, float("inf"), float("inf"), False)
    max_abs = float(np.max(np.abs(a - e))) if a.size else 0.0
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    return OutputError(name, max_abs, rel, bool(rel <= tol))


def check_model(path: str | Path, graph: Graph, *, tol: float = 1e-4, seed: int = 0,
                batch: int = 1, vocab: int | None = None) -> list[CaseResult]:
    """Run both engines on prefill (empty past, seq 7) and decode (one token on a past of 5)."""
    from kiln.compiler.frontend.feeds import make_feeds
    from kiln.compiler.frontend.onnxruntime_ref import run_onnxruntime
    from kiln.compiler.interpreter import run

    rng = np.random.default_rng(seed)
    vocab = vocab or 2
    params = {k: p.load() for k, p in graph.params.items()}
    results = []
    for case, seq, past in CASES:
        if past and not any("past" in v for v in graph.inputs):
            continue  # no KV-cache inputs (an encoder or a cache-less export)
        feeds = make_feeds(graph, batch=batch, seq=seq, past=past, rng=rng, vocab=vocab)
        ref = run_onnxruntime(path, feeds)
        try:
            got = run(graph, feeds, params=params)
        except (ValueError, TypeError, IndexError, MemoryError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise KilnError(f"{path}: kiln's interpreter cannot run the {case} case (which "
                            f"onnxruntime ran): {type(e).__name__}: {first}") from e
        res = CaseResult(case, seq, past)
        for name in graph.outputs:
            res.outputs.append(compare(got[name], ref[name], name, tol))
        if "logits" in ref:
            res.top1_agreement = float(np.mean(got["logits"].argmax(-1) ==
                                               ref["logits"].argmax(-1)))
        results.append(res)
    return results
