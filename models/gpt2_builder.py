"""ONNX graph of a GPT-2-family decoder (LayerNorm, learned positions, fused QKV, GELU-tanh).

Weights keep Hugging Face GPT-2 names; its Conv1D weights are already [in, out].
"""

from __future__ import annotations

import numpy as np
import onnx

from kiln.models import decoder_parts as dp
from kiln.models.config import DecoderConfig
from kiln.models.onnx_graph import GraphBuilder


def layer_norm(g: GraphBuilder, x: str, prefix: str, cfg: DecoderConfig) -> str:
    w = g.weight(f"{prefix}.weight", (cfg.hidden,))
    b = g.weight(f"{prefix}.bias", (cfg.hidden,))
    return g.op("LayerNormalization", x, w, b, axis=-1, epsilon=cfg.norm_eps)


def gelu_tanh(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), written out as HF's NewGELU."""
    cube = g.op("Mul", g.op("Pow", x, g.const(np.float32(3.0))), g.const(np.float32(0.044715)))
    inner = g.op("Mul", g.op("Add", x, cube), g.const(np.float32(np.sqrt(2.0 / np.pi))))
    one_plus = g.op("Add", g.op("Tanh", inner), g.const(np.float32(1.0)))
    return g.op("Mul", g.op("Mul", x, g.const(np.float32(0.5))), one_plus)


def attention(g: GraphBuilder, cfg: DecoderConfig, i: int, x: str, c: dp.Common) -> str:
    p, h = f"transformer.h.{i}.attn", cfg.hidden
    qkv = dp.linear(g, x, f"{p}.c_attn", h, 3 * h, True)
    q, k, v = g.op_multi("Split", qkv, g.ints(h, h, h), n_out=3, axis=-1)
    q, k, v = (dp.split_heads(g, t, c, cfg.heads, cfg.head_dim) for t in (q, k, v))
    k, v = dp.kv_with_past(g, i, k, v)
    ctx = dp.merge_heads(g, dp.attention_core(g, q, k, v, c, cfg.head_dim), c, h)
    return dp.linear(g, ctx, f"{p}.c_proj", h, h, True)


def layer(g: GraphBuilder, cfg: DecoderConfig, i: int, x: str, c: dp.Common) -> str:
    p = f"transformer.h.{i}"
    x = g.op("Add", x, attention(g, cfg, i, layer_norm(g, x, f"{p}.ln_1", cfg), c))
    h = dp.linear(g, layer_norm(g, x, f"{p}.ln_2", cfg), f"{p}.mlp.c_fc", cfg.hidden, cfg.ffn,
                  True)
    return g.op("Add", x, dp.linear(g, gelu_tanh(g, h), f"{p}.mlp.c_proj", cfg.ffn, cfg.hidden,
                                    True))


def build_gpt2(cfg: DecoderConfig, data_file: str) -> tuple[GraphBuilder, onnx.ModelProto]:
    """The whole GPT-2 graph; weights are declared external in `data_file` (not written)."""
    g = GraphBuilder("gpt2_decoder", data_file)
    wte = g.weight("transformer.wte.weight", (cfg.vocab, cfg.hidden))
    wpe = g.weight("transformer.wpe.weight", (cfg.max_positions, cfg.hidden))
    x = g.op("Add", g.op("Gather", wte, "input_ids", axis=0),
             g.op("Gather", wpe, "position_ids", axis=0))
    common = dp.build_common(g)
    for i in range(cfg.layers):
        x = layer(g, cfg, i, x, common)
    x = layer_norm(g, x, "transformer.ln_f", cfg)
    if cfg.tie_embeddings:
        logits = dp.tied_lm_head(g, x, wte)
    else:
        logits = dp.linear(g, x, "lm_head", cfg.hidden, cfg.vocab, False)
    dp.emit_logits(g, logits)
    return g, g.model(dp.decoder_inputs(cfg), dp.decoder_outputs(cfg))
