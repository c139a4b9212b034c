"""What a canonical graph is: family, dimensions, rotary and norm settings, leftover generic ops."""

from __future__ import annotations

from typing import Any

from kiln.compiler.ir import Graph

CANONICAL_OPS = frozenset({"linear", "embedding", "rms_norm", "layer_norm", "gelu", "silu",
                           "silu_mul", "gelu_mul", "rotary", "attention", "quant_linear",
                           "quant_embedding", "sparse_linear"})


def describe(graph: Graph) -> dict[str, Any]:
    """A JSON-able architecture summary of a canonicalized graph."""
    attn = [n for n in graph.nodes if n.op == "attention"]
    norms = [n for n in graph.nodes if n.op in ("rms_norm", "layer_norm")]
    rot = [n for n in graph.nodes if n.op == "rotary"]
    emb = [n for n in graph.nodes if n.op in ("embedding", "quant_embedding")]
    acts = {n.op for n in graph.nodes if n.op in ("silu", "silu_mul", "gelu", "gelu_mul")}
    first = attn[0].attrs if attn else {}
    info: dict[str, Any] = {
        "family": _family(attn, norms, rot, acts),
        "layers": len(attn),
        "hidden": _hidden(graph, emb),
        "heads": first.get("num_heads"),
        "kv_heads": first.get("num_kv_heads"),
        "head_dim": first.get("head_dim"),
        "vocab": _vocab(graph, emb),
        "causal": first.get("causal") if attn else None,
        "attention_mask": "recognized" if attn and all(n.inputs[5] or n.attrs["causal"]
                                                       for n in attn) else
        ("generic bias" if attn else None),
        "rope": _rope(rot),
        "norm": _norm(norms),
        "activation": sorted(acts),
        "kv_cache": bool(attn) and all(n.inputs[3] for n in attn),
    }
    return info


def generic_ops(graph: Graph) -> dict[str, int]:
    """Ops left at ONNX level after canonicalization, with counts."""
    return {op: c for op, c in graph.op_histogram().items() if op not in CANONICAL_OPS}


def ops_per_layer(graph: Graph) -> float | None:
    layers = sum(1 for n in graph.nodes if n.op == "attention")
    return len(graph.nodes) / layers if layers else None


def _family(attn, norms, rot, acts) -> str:
    if not attn:
        return "unknown"
    if not attn[0].attrs.get("causal", False) and not attn[0].inputs[3]:
        return "encoder (bert-like)"
    if norms and norms[0].op == "rms_norm" and rot:
        return "llama-like decoder"
    if norms and norms[0].op == "layer_norm" and not rot:
        return "gpt2-like decoder"
    return "decoder"


def _hidden(graph: Graph, emb) -> int | None:
    if emb:  # the output's last dim: the table may be packed or quantized
        shape = graph.types[emb[0].outputs[0]].shape
        return shape[-1] if shape else None
    return None


def _vocab(graph: Graph, emb) -> int | None:
    logits = graph.types.get("logits")
    if logits is not None and logits.shape:
        return logits.shape[-1]
    if emb:
        shape = graph.types[emb[0].inputs[0]].shape
        return shape[0] if shape else None
    return None


def _rope(rot) -> dict[str, Any] | None:
    if not rot:
        return None
    a = rot[0].attrs
    return {"style": "interleaved" if a.get("interleaved") else "rotate-half",
            "head_dim": a["head_dim"]}


def _norm(norms) -> dict[str, Any] | None:
    if not norms:
        return None
    eps = sorted({float(n.attrs["eps"]) for n in norms})
    return {"kind": norms[0].op, "eps": eps[0] if len(eps) == 1 else eps}




#: a weight with fewer exact zeros than this is reported dense
SPARSE_REPORT = 0.01


def weight_sparsity(graph: Graph) -> list[dict[str, Any]] | None:
    """Per linear weight: its shape, the fraction of exact zeros and the tightest N:M pattern
    its zeros follow (kiln.runtime.sparse_format.nm_pattern); None when the weights are not
    at hand (a graph imported without them)."""
    from kiln.runtime.sparse_format import nm_pattern, zero_fraction

    out = []
    for n in graph.nodes:
        p = graph.params.get(n.inputs[1]) if n.op == "linear" and len(n.inputs) > 1 else None
        if p is None or len(p.type.shape or ()) != 2:
            continue
        if not p.source.available:
            return None
        w = p.load()
        pattern = nm_pattern(w)
        out.append({"node": n.name, "weight": p.name, "shape": list(w.shape),
                    "zeros": round(zero_fraction(w), 4),
                    "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None})
    return out
