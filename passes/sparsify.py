"""The `sparsify` pass: linears whose weights hold enough exact zeros become `sparse_linear`, in
the layout the target's kernels take, wherever the cost model says it pays.

Candidates: `linear` with a 2-D float32 weight parameter read by linears alone, and the int8
per-output-channel `quant_linear` (symmetric, layout "nk": codes int8[N, K], scales [N, 1]),
whether the zeros come from kiln's pruning (kiln.passes.prune_weights) or were already in the
export (a pruned checkpoint). What the zeros look like is known
- from the pruning config (graph.meta["sparsity"]) for a weight the pruning pass derived: at
  most K - zeros(K) non-zeros per row, or 2 of every 4 for 2:4 (no weights needed, so a
  --no-weights compile decides as a compile with the weights does);
- else from the weight itself, when it is at hand (an int8 weight: from the float weight it is
  quantized from; a zero stays a zero code);
- else it is unknown, and the linear stays dense.

The cost model (SparseTarget.speedup): decode reads every weight once per token; a GEMV takes
the longer of streaming its bytes and doing its arithmetic, each kernel at its measured speed
(SPARSE_TARGETS). A weight converts when the predicted decode speedup reaches `min_speedup`: a
weight with few zeros stays dense, and so does one whose dense kernel is already bound by
arithmetic the sparse kernel cannot beat (int8 on the CPU). Prefill runs the dense
micro-kernel on an expanded panel, so it does not decide.

Targets: "cpu" takes the "bitmap" layout for float32 and int8 weights (kiln.codegen.kernels.
sparse_linear); "cuda" takes the 2:4 "nm" layout for float weights that are exactly 2:4
(kiln.codegen.cuda.lower_sparse). The parameters are Derived by "sparse_encode" (numpy only:
kiln.runtime.sparse_format), so `kiln convert` and the bundle's converter rebuild them. Each
decision is recorded in graph.meta["sparse"] (weight -> layout, capacity, zero fraction,
predicted speedup); `plan` (a recorded meta["sparse"]) replays the decisions as they were.
Requires: linear recognized; runs after quantize_weights and before pack_linear_weights.
Preserves: every value name and type except the converted weights' parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from kiln.compiler.ir import Attrs, Derived, DType, Graph, Node, Param, ParamSource, TensorType
from kiln.passes import register
from kiln.passes.prune_weights import PRUNERS
from kiln.runtime import sparse_format as sf


@dataclass(frozen=True, slots=True)
class SparseTarget:
    """What a target's sparse kernels take, and how fast its decode GEMVs run.

    A GEMV's time is the larger of streaming its bytes (memory) and its arithmetic (compute):
    time = max(bytes / bandwidth, weights / rate), `rate` being the kernel's speed with its
    weight in cache. The dense kernel of a memory-bound weight gains from fewer bytes as far as
    the sparse kernel's arithmetic allows."""

    layout: str  # "bitmap" | "nm"
    bandwidth: float  # bytes/s the dense decode GEMVs stream weights at
    #: weight kind ("float32" | "int8") -> (dense rate, sparse rate), weights/s in cache
    rates: tuple[tuple[str, float, float], ...]
    #: the fraction of `bandwidth` the sparse kernel streams its bytes at
    sparse_stream: float = 1.0
    #: bytes of one stored float weight (CUDA stores float16)
    float_bytes: int = 4
    min_speedup: float = 1.1

    def speedup(self, kind: str, weights: int, dense_bytes: int, sparse_bytes: int,
                ) -> float | None:
        """Predicted decode speedup of one weight's GEMV (None: no sparse kernel for `kind`)."""
        rate = {k: (d, s) for k, d, s in self.rates}.get(kind)
        if rate is None:
            return None
        dense = max(dense_bytes / self.bandwidth, weights / rate[0])
        sparse = max(sparse_bytes / (self.bandwidth * self.sparse_stream), weights / rate[1])
        return dense / sparse


#: cpu (2-core Zen, 2 threads; benchmarks/sparse_kernels.py, benchmarks/RESULTS.md "Sparsity
#: (session 5)" and "Session 11"): bandwidth as the quiet machine's decode streams it (40-44
#: GB/s probed); rates in weights/s with the weight in cache: fp32 dense 44-51e9 and sparse
#: 42-53e9 (the one-block, two-chain GEMV, quiet host, session 11); int8 dense ~32-37e9 and
#: sparse ~15-20e9 (shared host, session 5; session 11's loaded A/B: 40-52e9 vs 21-27e9): the
#: int8 sparse GEMV's expand adds an op to the dense one's three per 16 weights, so int8 stays
#: dense, its dense GEMV being near the bandwidth. The model's absolute scale matters less than
#: the ratios: fp32 pays from ~13% zeros on, int8 never on this CPU.
#: cpu-avx2 (the AVX2 + BMI2 kernels, compiled for znver3 and run on session 8's Zen host): the
#: permute-based expand costs about twice the dense GEMV's work per 16 weights whatever the
#: zeros, ~10e9 weights/s: SmolLM2 decode at 70% zeros 1.06x dense, at 50% 0.97x (benchmarks/
#: RESULTS.md, "Sparsity (session 8)"), so weights stay dense unless a faster CPU is measured.
#: cuda: memory-bound GEMVs (H200, 4.2 TB/s measured in session 4); the 2:4 GEMV streams its
#: compressed bytes at 95% of the dense GEMV's rate (65536x2048: 4.21 vs 4.45 TB/s; SwiGLU 4.24
#: vs 4.40; benchmarks/gpu/sparse_kernels.py, benchmarks/gpu/cuda_llm_log.md run 17).
_INF = float("inf")
SPARSE_TARGETS: dict[str, SparseTarget] = {
    "cpu": SparseTarget("bitmap", 40e9, (("float32", 47e9, 45e9), ("int8", 35e9, 18e9))),
    "cpu-avx2": SparseTarget("bitmap", 40e9, (("float32", 17e9, 10e9), ("int8", 35e9, 10e9))),
    "cuda": SparseTarget("nm", 4.2e12, (("float32", _INF, _INF),), sparse_stream=0.95,
                         float_bytes=2),
}



@dataclass(frozen=True, slots=True)
class _Candidate:
    weight: str  # the parameter the decision is recorded under (float weight or int8 codes)
    kind: str  # "float32" | "int8"
    n: int
    k: int
    source: ParamSource  # of what is encoded (float weight or int8 codes)
    dense: ParamSource  # of the float weight whose zeros decide (loaded only when needed)
    scales: str = ""  # int8: the [N, 1] scales parameter


@register("sparsify")
def sparsify(graph: Graph, *, target: str | SparseTarget | None = None,
             plan: Mapping[str, Mapping] | None = None) -> Graph:
    """`target`: a SPARSE_TARGETS name or a SparseTarget (None: the pass does nothing); `plan`:
    decisions recorded by an earlier run (graph.meta["sparse"]), replayed instead of deciding."""
    tgt = SPARSE_TARGETS.get(target) if isinstance(target, str) else target
    if tgt is None:
        return graph
    candidates = _candidates(graph)
    decisions = {}
    for c in candidates.values():
        d = dict(plan[c.weight]) if plan is not None and c.weight in plan else (
            None if plan is not None else _decide(graph, tgt, c))
        if d is not None:
            decisions[c.weight] = d
    if not decisions:
        return graph
    params, types = dict(graph.params), dict(graph.types)
    made = {w: _add_sparse(params, types, graph, candidates[w], d) for w, d in
            decisions.items()}
    nodes = tuple(_rewrite(n, made) for n in graph.nodes)
    used = {v for n in nodes for v in n.inputs}
    for name in {x for w in decisions for x in (w, candidates[w].scales) if x} - used:
        del params[name], types[name]
    return graph.replace(nodes=nodes, params=params, types=types,
                         meta={**graph.meta, "sparse": decisions})


def _candidates(graph: Graph) -> dict[str, _Candidate]:
    readers: dict[str, set[tuple[str, int]]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.params:
                readers.setdefault(v, set()).add((n.op, i))
    out: dict[str, _Candidate] = {}
    for n in graph.nodes:
        if n.op == "linear" and len(n.inputs) > 1 and n.inputs[1] in graph.params:
            p = graph.params[n.inputs[1]]
            shape = p.type.shape or ()
            if readers[p.name] == {("linear", 1)} and p.type.dtype is DType.f32 and \
                    len(shape) == 2 and all(isinstance(d, int) for d in shape):
                out[p.name] = _Candidate(p.name, "float32", *shape, p.source, p.source)
        elif n.op == "quant_linear" and not n.attrs.get("act_bits") and _per_channel_int8(
                graph, n, readers):
            q, s = graph.params[n.inputs[1]], n.inputs[2]
            dense = q.source.sources[0] if isinstance(q.source, Derived) and \
                q.source.fn in ("quantize", "gptq") else q.source
            out[q.name] = _Candidate(q.name, "int8", int(n.attrs["out_features"]),
                                     int(n.attrs["in_features"]), q.source, dense, s)
    return out


def _per_channel_int8(graph: Graph, n: Node, readers) -> bool:
    a = n.attrs
    zp = n.inputs[3] if len(n.inputs) > 3 else ""
    k = int(a["in_features"])
    return (int(a["bits"]) == 8 and int(a["group_size"]) == k and a.get("layout") == "nk"
            and not zp and all(v in graph.params for v in n.inputs[1:3])
            and readers[n.inputs[1]] == {("quant_linear", 1)}
            and graph.params[n.inputs[1]].type.shape == (int(a["out_features"]), k))


def _pruned_bound(graph: Graph, src: ParamSource):
    """The pruning pattern (kiln.runtime.pruning.Pattern) of a weight the pruning pass derived,
    from the recorded config; None for any other weight."""
    cfg = graph.meta.get("sparsity")
    if cfg is None or not _derived_by_pruning(src):
        return None
    from kiln.runtime.pruning import Pattern

    return Pattern.from_dict(cfg)


def _derived_by_pruning(src: ParamSource) -> bool:
    if not isinstance(src, Derived):
        return False
    # "prune_fraction": GPTQ pruning jointly, as artifacts before session 11 recorded it
    if src.fn in PRUNERS or "prune_fraction" in src.attrs:
        return True
    return any(_derived_by_pruning(s) for s in src.sources)


def _decide(graph: Graph, tgt: SparseTarget, c: _Candidate) -> dict | None:
    if c.kind not in {k for k, _, _ in tgt.rates} or not _fits(tgt.layout, c.n, c.k):
        return None
    pattern = _pruned_bound(graph, c.source)
    if pattern is not None:
        zeros = pattern.zeros(c.k)
        nm = pattern.structured and pattern.m == 4 and pattern.n <= 2
        capacity = sf.bitmap_bound(c.n, c.k, c.k - zeros)
    elif c.dense.available:
        w = np.asarray(c.dense.load())
        zeros = round(sf.zero_fraction(w) * c.k)
        nm = tgt.layout == "nm" and sf.nm_pattern(w) in ((1, 4), (2, 4))
        capacity = sf.bitmap_capacity(w) if tgt.layout == "bitmap" else 0
    else:
        return None
    if tgt.layout == "nm" and not nm:
        return None
    itemsize = 1 if c.kind == "int8" else tgt.float_bytes
    dense = c.n * c.k * itemsize
    sparse = (c.n * c.k // 2 * itemsize + c.n * -(-c.k // 8) if tgt.layout == "nm" else
              c.n // sf.BLOCK * (capacity * itemsize + c.k * 2))
    speedup = tgt.speedup(c.kind, c.n * c.k, dense, sparse)
    if speedup < tgt.min_speedup:
        return None
    return {"layout": tgt.layout, "kind": c.kind, "capacity": capacity,
            "zeros": round(zeros / c.k, 4), "speedup": round(speedup, 3)}


def _fits(layout: str, n: int, k: int) -> bool:
    return n % sf.BLOCK == 0 if layout == "bitmap" else k % 4 == 0


def _add_sparse(params: dict, types: dict, graph: Graph, c: _Candidate, d: Mapping,
                ) -> tuple[tuple[str, ...], Attrs]:
    layout = d["layout"]
    if layout == "bitmap":
        vshape, mshape, mdt = (c.n // sf.BLOCK, int(d["capacity"])), (c.n // sf.BLOCK, c.k), \
            DType.u16
        extra = {"capacity": int(d["capacity"])}
    else:
        vshape, mshape, mdt, extra = (c.n, c.k // 2), (c.n, -(-c.k // 8)), DType.u8, {}
    vdt = DType.i8 if c.kind == "int8" else DType.f32
    names = []
    for part, t in (("values", TensorType(vdt, vshape)), ("meta", TensorType(mdt, mshape))):
        src = Derived("sparse_encode", (c.source,), Attrs({"layout": layout, "part": part,
                                                            **extra}))
        p = Param(f"{c.weight}.{layout}.{part}", t, src)
        params[p.name], types[p.name] = p, t
        names.append(p.name)
    scales = ""
    if c.scales:
        t = TensorType(DType.f32, (c.n,))
        p = Param(f"{c.scales}.rows", t, Derived("reshape", (graph.params[c.scales].source,),
                                                  Attrs({"shape": (c.n,)})))
        params[p.name], types[p.name] = p, t
        scales = p.name
    attrs = Attrs({"layout": layout, "in_features": c.k, "out_features": c.n})
    return (names[0], names[1], scales), attrs


def _rewrite(n: Node, made: dict) -> Node:
    if n.op not in ("linear", "quant_linear") or len(n.inputs) < 2 or n.inputs[1] not in made:
        return n
    (values, meta, scales), attrs = made[n.inputs[1]]
    slot = 2 if n.op == "linear" else 4
    bias = n.inputs[slot] if len(n.inputs) > slot else ""
    inputs = (n.inputs[0], values, meta, scales, bias) if bias else (
        (n.inputs[0], values, meta, scales) if scales else (n.inputs[0], values, meta))
    return dataclasses.replace(n, op="sparse_linear", inputs=inputs, attrs=attrs)
