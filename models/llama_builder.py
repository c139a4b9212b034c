"""ONNX graph of a Llama-family decoder (RMSNorm, rotate-half RoPE, GQA, SiLU-gated MLP).

Written the way a plain exporter writes it: MatMul with [in, out] weights, Reshape/Transpose for
heads, RoPE from position_ids and inv_freq, a Range/Less/Where mask, ReduceMean/Pow/Sqrt RMSNorm,
SiLU as x * Sigmoid(x), GQA by Expand/Reshape, tied embeddings as Gather + MatMul(Transpose(E)).
No fused or contrib ops. Weight names follow Hugging Face's, but linear weights are stored
transposed ([in, out]) because they are MatMul's B operand.
"""

from __future__ import annotations

import numpy as np
import onnx

from kiln.models import decoder_parts as dp
from kiln.models.config import DecoderConfig
from kiln.models.onnx_graph import GraphBuilder


def rope_inv_freq(cfg: DecoderConfig) -> np.ndarray:
    exponents = np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim
    return (1.0 / cfg.rope_theta**exponents).astype(np.float32)


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    mean_sq = g.op("ReduceMean", g.op("Pow", x, g.const(np.float32(2.0))), g.ints(-1),
                   keepdims=1)
    denom = g.op("Sqrt", g.op("Add", mean_sq, g.const(np.float32(eps))))
    return g.op("Mul", g.op("Div", x, denom), weight)


def rope_tables(g: GraphBuilder, cfg: DecoderConfig) -> tuple[str, str]:
    """cos/sin [batch, 1, seq, head_dim] from position_ids (HF layout: freqs repeated twice)."""
    pos = g.op("Unsqueeze", g.op("Cast", "position_ids", to=onnx.TensorProto.FLOAT), g.ints(-1))
    freqs = g.op("Mul", pos, g.const(rope_inv_freq(cfg), "inv_freq"))  # [batch, seq, d/2]
    emb = g.op("Concat", freqs, freqs, axis=-1)
    return (g.op("Unsqueeze", g.op("Cos", emb), g.ints(1)),
            g.op("Unsqueeze", g.op("Sin", emb), g.ints(1)))


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int) -> str:
    half = head_dim // 2
    x1 = g.op("Slice", x, g.ints(0), g.ints(half), g.ints(-1))
    x2 = g.op("Slice", x, g.ints(half), g.ints(head_dim), g.ints(-1))
    rotated = g.op("Concat", g.op("Neg", x2), x1, axis=-1)
    return g.op("Add", g.op("Mul", x, cos), g.op("Mul", rotated, sin))


def attention(g: GraphBuilder, cfg: DecoderConfig, i: int, x: str, c: dp.Common,
              rope: tuple[str, str]) -> str:
    p, d = f"model.layers.{i}.self_attn", cfg.head_dim
    q_dim, kv_dim = cfg.heads * d, cfg.kv_heads * d
    q = dp.linear(g, x, f"{p}.q_proj", cfg.hidden, q_dim, cfg.attention_bias)
    k = dp.linear(g, x, f"{p}.k_proj", cfg.hidden, kv_dim, cfg.attention_bias)
    v = dp.linear(g, x, f"{p}.v_proj", cfg.hidden, kv_dim, cfg.attention_bias)
    q = apply_rope(g, dp.split_heads(g, q, c, cfg.heads, d), *rope, d)
    k = apply_rope(g, dp.split_heads(g, k, c, cfg.kv_heads, d), *rope, d)
    v = dp.split_heads(g, v, c, cfg.kv_heads, d)
    k, v = dp.kv_with_past(g, i, k, v)
    n_rep = cfg.heads // cfg.kv_heads
    k, v = dp.repeat_kv(g, k, n_rep, cfg.heads), dp.repeat_kv(g, v, n_rep, cfg.heads)
    ctx = dp.merge_heads(g, dp.attention_core(g, q, k, v, c, d), c, q_dim)
    return dp.linear(g, ctx, f"{p}.o_proj", q_dim, cfg.hidden, False)


def mlp(g: GraphBuilder, cfg: DecoderConfig, i: int, x: str) -> str:
    p, b = f"model.layers.{i}.mlp", cfg.mlp_bias
    gate = dp.linear(g, x, f"{p}.gate_proj", cfg.hidden, cfg.ffn, b)
    up = dp.linear(g, x, f"{p}.up_proj", cfg.hidden, cfg.ffn, b)
    act = g.op("Mul", gate, g.op("Sigmoid", gate))
    return dp.linear(g, g.op("Mul", act, up), f"{p}.down_proj", cfg.ffn, cfg.hidden, b)


def layer(g: GraphBuilder, cfg: DecoderConfig, i: int, x: str, c: dp.Common,
          rope: tuple[str, str]) -> str:
    p = f"model.layers.{i}"
    h = rms_norm(g, x, g.weight(f"{p}.input_layernorm.weight", (cfg.hidden,)), cfg.norm_eps)
    x = g.op("Add", x, attention(g, cfg, i, h, c, rope))
    h = rms_norm(g, x, g.weight(f"{p}.post_attention_layernorm.weight", (cfg.hidden,)),
                 cfg.norm_eps)
    return g.op("Add", x, mlp(g, cfg, i, h))


def build_llama(cfg: DecoderConfig, data_file: str) -> tuple[GraphBuilder, onnx.ModelProto]:
    """The whole decoder graph; weights are declared external in `data_file` (not written)."""
    g = GraphBuilder("llama_decoder", data_file)
    embed = g.weight("model.embed_tokens.weight", (cfg.vocab, cfg.hidden))
    x = g.op("Gather", embed, "input_ids", axis=0)
    common, rope = dp.build_common(g), rope_tables(g, cfg)
    for i in range(cfg.layers):
        x = layer(g, cfg, i, x, common, rope)
    x = rms_norm(g, x, g.weight("model.norm.weight", (cfg.hidden,)), cfg.norm_eps)
    if cfg.tie_embeddings:
        logits = dp.tied_lm_head(g, x, embed)
    else:
        logits = dp.linear(g, x, "lm_head", cfg.hidden, cfg.vocab, False)
    dp.emit_logits(g, logits)
    return g, g.model(dp.decoder_inputs(cfg), dp.decoder_outputs(cfg))
