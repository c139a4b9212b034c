"""The `prune_weights` pass: linear weights pruned to a sparsity pattern, by SparseGPT, Wanda or
magnitude.

Methods (the pattern, a fraction of every row or N:M along the input dimension:
kiln.runtime.pruning):
- sparsegpt (default; Frantar & Alistarh, 2023): one-shot optimal-brain-surgeon pruning with the
  Hessian H = X^T X of each linear's calibration inputs, the mask chosen per block of columns as
  the sweep corrects the weights (kiln.passes.gptq.sweep, GPTQ's machinery); then the kept
  entries re-solved by least squares for that mask (kiln.passes.gptq.refit, REFINE steps of
  conjugate gradients), which the sweep only approximates; H dampened by DAMP_SPARSEGPT (10% of
  its mean diagonal, not GPTQ's 1%: a pull toward the original weights that generalizes better).
  On SmolLM2-135M at 50%: perplexity +76.3% of fp32 (sweep, 1%) -> +68.4% (refit) -> +64.7%
  (refit, 10%) on a text of another domain (benchmarks/logs/sparsegpt_refine_session10.md).
- wanda (Sun et al., 2023): drop the entries of least |W[n, k]| * ||X[:, k]||_2 in each row.
- magnitude: drop the entries of least |W[n, k]| in each row.
The calibrated methods take their inputs sequentially, as GPTQ does (kiln.passes.gptq.calibrate):
each linear sees its input as the already-pruned layers before it produce it.

Output: the same graph, each pruned weight a parameter of the same name and shape holding exact
zeros, Derived from the original by "sparsegpt" (with the Hessian), "prune_wanda" (with the input
norms) or "prune_magnitude", so `kiln convert` (and, for magnitude, the GPU host's converter)
rebuild it. The config is recorded in graph.meta["sparsity"]. Embeddings, the LM head (a linear
making a graph output) and weights matching a `keep` pattern stay dense; so does any weight a
non-linear reads.

With a GPTQ quantization preset after it, kiln.passes.quantize solves every pruned weight from
its pruned value with the quantizer's Hessian, keeping its zeros (`gptq_source`): the mask and
the kept values are the pruner's (for SparseGPT, refit). Re-solving a SparseGPT weight jointly
instead (one GPTQ sweep over the original weight choosing the mask and the codes, without the
refit or the pruner's dampening) measured worse on SmolLM2 at 50% with w8: +90.4% perplexity
against +64.9% (benchmarks/RESULTS.md, session 11).
Requires: linear recognized (canonical graph). Preserves: every value name, type and node.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.ir import PARAM_TRANSFORMS, Attrs, Derived, DType, Graph, Inline, Param
from kiln.passes import register
from kiln.passes.gptq import DAMP, REFINE, memoized, sparsegpt
from kiln.runtime.pruning import Pattern, PatternError, prune, prune_magnitude

METHODS = ("sparsegpt", "wanda", "magnitude")
#: the parameter transforms that prune (a pruned weight is Derived by one of them)
PRUNERS = frozenset({"sparsegpt", "prune_wanda", "prune_magnitude"})
#: SparseGPT's dampening, relative to H's mean diagonal (1% and 50% measured worse than 10%)
DAMP_SPARSEGPT = 0.1
CALIBRATED = ("sparsegpt", "wanda")


@dataclass(frozen=True, slots=True)
class PruneConfig:
    """What `kiln compile --sparsity S --prune-method M --sparsity-keep P` asks for."""

    pattern: Pattern
    method: str = "sparsegpt"
    keep: tuple[str, ...] = ()  # fnmatch patterns of node/param names kept dense
    damp: float = DAMP_SPARSEGPT
    refine: int = REFINE  # sparsegpt: conjugate-gradient steps re-solving the kept entries

    def to_dict(self) -> dict:
        return {"sparsity": str(self.pattern), **self.pattern.to_dict(), "method": self.method,
                "keep": list(self.keep), "damp": self.damp, "refine": self.refine}

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        """The config a manifest recorded (`to_dict`; one without "refine" predates it: 0)."""
        return cls(Pattern.from_dict(d), d["method"], tuple(d.get("keep", ())),
                   float(d.get("damp", DAMP)), int(d.get("refine", 0)))


def parse_config(sparsity: str | None, method: str | None = None,
                 keep: tuple[str, ...] | list[str] = ()) -> PruneConfig | None:
    """The CLI's options -> a config (None without --sparsity); bad values -> KilnError."""
    if sparsity is None:
        if method or keep:
            flag = "--prune-method" if method else "--sparsity-keep"
            raise KilnError(f"{flag} needs --sparsity S (a fraction such as 0.5, or 2:4)")
        return None
    method = (method or "sparsegpt").lower()
    if method not in METHODS:
        raise KilnError(f"--prune-method {method}: unknown; known: {', '.join(METHODS)}")
    try:
        return PruneConfig(Pattern.parse(sparsity), method, tuple(keep))
    except PatternError as e:
        raise KilnError(str(e)) from None


@register("prune_weights")
def prune_weights(graph: Graph, *, config: PruneConfig | None = None,
                  calibration: tuple = ()) -> Graph:
    """Prune the linear weights per `config` (None: the graph as it is). `calibration`: token
    windows (1, T) of the calibration text, needed by sparsegpt and wanda (with the weights)."""
    if config is None:
        return graph
    chosen = prunable(graph, config.keep)
    for name, node in chosen.items():
        try:
            config.pattern.check(graph.params[name].type.shape[1],
                                 f"node {node} (linear), weight {name} of shape "
                                 f"{list(graph.params[name].type.shape)}")
        except PatternError as e:
            raise KilnError(str(e)) from None
    stats = _calibrate(graph, config, sorted(chosen), calibration)
    params = dict(graph.params)
    for name in chosen:
        p = graph.params[name]
        params[name] = Param(name, p.type, _pruned_source(p, config, stats.get(name)))
    return graph.replace(params=params, meta={**graph.meta, "sparsity": config.to_dict()})


def prunable(graph: Graph, keep: tuple[str, ...] = ()) -> dict[str, str]:
    """weight name -> the name of the linear reading it, for every weight the pass prunes: a
    2-D float32 parameter read only as linears' weights, not the LM head's, not kept."""
    readers: dict[str, set[tuple[str, int]]] = {}
    for n in graph.nodes:
        for i, v in enumerate(n.inputs):
            if v in graph.params:
                readers.setdefault(v, set()).add((n.op, i))
    out = {}
    for n in graph.nodes:
        if n.op != "linear" or len(n.inputs) < 2 or n.outputs[0] in graph.outputs:
            continue
        w = n.inputs[1]
        p = graph.params.get(w)
        if p is None or readers[w] != {("linear", 1)} or p.type.dtype is not DType.f32 or \
                len(p.type.shape or ()) != 2:
            continue
        if any(fnmatch.fnmatchcase(s, pat) for pat in keep for s in (n.name, w)):
            continue
        out[w] = n.name
    return out


def _calibrate(graph: Graph, config: PruneConfig, weights: list[str],
               calibration: tuple) -> dict[str, np.ndarray]:
    """weight -> the Hessian of its input (sparsegpt) or the input's column norms (wanda), each
    taken with the weights before it already pruned; {} for magnitude."""
    if config.method not in CALIBRATED or not weights:
        return {}
    if not calibration:
        raise KilnError(f"--prune-method {config.method} needs calibration text, tokenized with "
                        "the model's tokenizer: no tokenizer.json beside the model (use "
                        "--prune-method magnitude, or put the tokenizer there)")
    if not all(graph.params[w].source.available for w in weights):
        raise KilnError(f"--prune-method {config.method} needs the weights to calibrate with "
                        "(compiled --no-weights, or the weights file is missing); use "
                        "--prune-method magnitude")
    from kiln.passes.gptq import calibrate

    def pruned(name: str, w: np.ndarray, h: np.ndarray) -> np.ndarray:
        return _solve(config.method, w, _stat(config.method, h), config)

    hess = calibrate(graph, weights, list(calibration), pruned)
    return {w: _stat(config.method, h) for w, h in hess.items()}


def _stat(method: str, h: np.ndarray) -> np.ndarray:
    """What a method keeps of H: all of it (sparsegpt), or ||X[:, k]||_2 (wanda)."""
    return h if method == "sparsegpt" else np.sqrt(np.maximum(np.diag(h), 0.0))


def _solve(method: str, w: np.ndarray, stat: np.ndarray | None, config: PruneConfig,
           ) -> np.ndarray:
    attrs = {**config.pattern.to_dict()}
    if method == "sparsegpt":
        return _sparsegpt(w, stat, damp=config.damp, refine=config.refine, **attrs)
    if method == "wanda":
        return _wanda(w, stat, **attrs)
    return prune_magnitude(w, **attrs)


def _pruned_source(p: Param, config: PruneConfig, stat: np.ndarray | None) -> Derived:
    attrs = Attrs(config.pattern.to_dict())
    if config.method == "magnitude":
        return Derived("prune_magnitude", (p.source,), attrs)
    fn = "sparsegpt" if config.method == "sparsegpt" else "prune_wanda"
    extra = {"damp": config.damp, "refine": config.refine} if config.method == "sparsegpt" \
        else {}
    return Derived(fn, (p.source, Inline(stat)), attrs.updated(**extra))


def _sparsegpt(w: np.ndarray, h: np.ndarray, *, fraction: float, n: int = 0, m: int = 0,
               damp: float = DAMP, refine: int = 0) -> np.ndarray:
    """The parameter transform "sparsegpt" (a derivation without "refine" predates it: 0)."""
    pattern = Pattern(fraction, n, m)
    return memoized("sparsegpt", (w, h), (fraction, n, m, damp, refine),
                    lambda: sparsegpt(np.asarray(w, np.float32), np.asarray(h, np.float64),
                                      pattern, damp=damp, refine=refine))


def _wanda(w: np.ndarray, norms: np.ndarray, *, fraction: float, n: int = 0, m: int = 0,
           ) -> np.ndarray:
    w = np.asarray(w, np.float32)
    score = np.abs(w).astype(np.float64) * np.asarray(norms, np.float64)[None, :]
    return prune(w, score, Pattern(fraction, n, m))


PARAM_TRANSFORMS["sparsegpt"] = _sparsegpt
PARAM_TRANSFORMS["prune_wanda"] = _wanda
PARAM_TRANSFORMS["prune_magnitude"] = prune_magnitude


def gptq_source(p: Param) -> tuple:
    """(the source GPTQ solves from, its extra attrs) for a weight this pass may have pruned:
    the pruned weight, its zeros kept; anything else is solved as it is."""
    src = p.source
    if isinstance(src, Derived) and src.fn in PRUNERS:
        return src, {"keep_zeros": True}
    return src, {}
