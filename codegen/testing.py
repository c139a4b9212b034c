"""A hand-built canonical Llama graph with seeded weights (until the recognizer produces one).

Rotary cos/sin: tables [max_pos, head_dim] are parameters computed here in float64 and gathered
with `embedding(table, position_ids)`. This keeps the graph to canonical ops only, puts no sin/cos
in any kernel, gives exact values, and supports left padding (position ids are per row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kiln.compiler.ir import (
    BATCH,
    PAST,
    SEQ,
    DType,
    Graph,
    Node,
    Param,
    TensorType,
    inline_param,
    sym,
)


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    max_pos: int = 2048
    eps: float = 1e-5
    rope_theta: float = 10000.0
    tied: bool = True


TINY = LlamaConfig(vocab=97, hidden=48, layers=2, heads=4, kv_heads=2, head_dim=12, ffn=80,
                   max_pos=128)
SMOLLM2_135M = LlamaConfig(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64,
                           ffn=1536, max_pos=8192, eps=1e-5, rope_theta=100000.0)


class _Builder:
    def __init__(self, cfg: LlamaConfig, seed: int):
        self.cfg, self.rng = cfg, np.random.default_rng(seed)
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self.params: dict[str, Param] = {}

    def param(self, name: str, array: np.ndarray) -> str:
        p = inline_param(name, np.ascontiguousarray(array, dtype=np.float32))
        self.params[name], self.types[name] = p, p.type
        return name

    def weight(self, name: str, n: int, k: int) -> str:
        return self.param(name, self.rng.standard_normal((n, k), dtype=np.float32) / np.sqrt(k))

    def norm(self, name: str) -> str:
        return self.param(name, 1.0 + 0.1 * self.rng.standard_normal(self.cfg.hidden))

    def node(self, op: str, inputs: list[str], out: str | list[str], shape: tuple, **attrs):
        outs = [out] if isinstance(out, str) else out
        self.nodes.append(Node(op, tuple(inputs), tuple(outs), attrs, name=outs[0]))
        for o in outs:
            self.types.setdefault(o, TensorType(DType.f32, shape))
        return out


def rope_tables(cfg: LlamaConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_pos, head_dim] in HF's split-halves layout (freqs repeated twice)."""
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    ang = np.outer(np.arange(cfg.max_pos), inv)
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def canonical_llama_graph(cfg: LlamaConfig = TINY, seed: int = 0) -> Graph:
    """Inputs input_ids/position_ids [batch, seq] i64, attention_mask [batch, past+seq] i64,
    past_k_i/past_v_i [batch, kv_heads, past, head_dim]; outputs logits and present_k/v_i."""
    g = _Builder(cfg, seed)
    b, s, p = sym(BATCH), sym(SEQ), sym(PAST)
    e = cfg.hidden
    inputs = ["input_ids", "position_ids", "attention_mask"]
    g.types.update({"input_ids": TensorType(DType.i64, (b, s)),
                    "position_ids": TensorType(DType.i64, (b, s)),
                    "attention_mask": TensorType(DType.i64, (b, p + s))})
    embed = g.param("embed_tokens", g.rng.standard_normal((cfg.vocab, e), dtype=np.float32))
    cos_t, sin_t = rope_tables(cfg)
    g.param("rope_cos", cos_t)
    g.param("rope_sin", sin_t)
    h = g.node("embedding", [embed, "input_ids"], "h0", (b, s, e))
    cos = g.node("embedding", ["rope_cos", "position_ids"], "cos", (b, s, cfg.head_dim))
    sin = g.node("embedding", ["rope_sin", "position_ids"], "sin", (b, s, cfg.head_dim))
    outputs = ["logits"]
    for i in range(cfg.layers):
        past_k, past_v = f"past_k_{i}", f"past_v_{i}"
        inputs += [past_k, past_v]
        for v in (past_k, past_v):
            g.types[v] = TensorType(DType.f32, (b, cfg.kv_heads, p, cfg.head_dim))
        h = _layer(g, i, h, cos, sin, past_k, past_v)
        outputs += [f"present_k_{i}", f"present_v_{i}"]
    n = g.node("rms_norm", [h, g.norm("norm")], "final_norm", (b, s, e), eps=cfg.eps)
    head = embed if cfg.tied else g.weight("lm_head", cfg.vocab, e)
    g.node("linear", [n, head], "logits", (b, s, cfg.vocab))
    return Graph(tuple(g.nodes), tuple(inputs), tuple(outputs), dict(g.types), g.params,
                 name="canonical_llama", meta={"config": cfg})


def _layer(g: _Builder, i: int, h: str, cos: str, sin: str, past_k: str, past_v: str) -> str:
    cfg = g.cfg
    b, s, p = sym(BATCH), sym(SEQ), sym(PAST)
    e, hd, kvd = cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    cache = (b, cfg.kv_heads, p + s, cfg.head_dim)
    x = g.node("rms_norm", [h, g.norm(f"l{i}.ln1")], f"l{i}.n1", (b, s, e), eps=cfg.eps)
    q = g.node("linear", [x, g.weight(f"l{i}.wq", hd, e)], f"l{i}.q", (b, s, hd))
    k = g.node("linear", [x, g.weight(f"l{i}.wk", kvd, e)], f"l{i}.k", (b, s, kvd))
    v = g.node("linear", [x, g.weight(f"l{i}.wv", kvd, e)], f"l{i}.v", (b, s, kvd))
    q = g.node("rotary", [q, cos, sin], f"l{i}.qr", (b, s, hd), num_heads=cfg.heads,
               head_dim=cfg.head_dim, interleaved=False)
    k = g.node("rotary", [k, cos, sin], f"l{i}.kr", (b, s, kvd), num_heads=cfg.kv_heads,
               head_dim=cfg.head_dim, interleaved=False)
    a, _, _ = g.node("attention", [q, k, v, past_k, past_v, "attention_mask"],
                     [f"l{i}.attn", f"present_k_{i}", f"present_v_{i}"], (b, s, hd),
                     num_heads=cfg.heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                     scale=1.0 / float(np.sqrt(cfg.head_dim)), causal=True)
    for o in (f"present_k_{i}", f"present_v_{i}"):
        g.types[o] = TensorType(DType.f32, cache)
    o = g.node("linear", [a, g.weight(f"l{i}.wo", e, hd)], f"l{i}.o", (b, s, e))
    h = g.node("Add", [h, o], f"l{i}.h1", (b, s, e))
    x = g.node("rms_norm", [h, g.norm(f"l{i}.ln2")], f"l{i}.n2", (b, s, e), eps=cfg.eps)
    gate = g.node("linear", [x, g.weight(f"l{i}.wg", cfg.ffn, e)], f"l{i}.g", (b, s, cfg.ffn))
    up = g.node("linear", [x, g.weight(f"l{i}.wu", cfg.ffn, e)], f"l{i}.u", (b, s, cfg.ffn))
    act = g.node("silu", [gate], f"l{i}.act", (b, s, cfg.ffn))
    gu = g.node("Mul", [act, up], f"l{i}.gu", (b, s, cfg.ffn))
    d = g.node("linear", [gu, g.weight(f"l{i}.wd", e, cfg.ffn)], f"l{i}.d", (b, s, e))
    return g.node("Add", [h, d], f"l{i}.h2", (b, s, e))
