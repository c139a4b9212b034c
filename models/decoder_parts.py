"""Graph pieces shared by the decoder builders: optimum's I/O, the attention mask, attention core.

I/O follows optimum's `text-generation-with-past` export exactly (names and dim names).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from kiln.models.config import DecoderConfig
from kiln.models.onnx_graph import GraphBuilder, tensor_input

BATCH, SEQ, PAST = "batch_size", "sequence_length", "past_sequence_length"
TOTAL = "past_sequence_length + sequence_length"
MASK_MIN = float(np.finfo(np.float32).min)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """optimum's input and output names, in its order for Llama-like models."""
    past = [f"past_key_values.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    present = [f"present.{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def decoder_inputs(cfg: DecoderConfig) -> list[onnx.ValueInfoProto]:
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    ios = [tensor_input("input_ids", i64, [BATCH, SEQ]),
           tensor_input("attention_mask", i64, [BATCH, TOTAL]),
           tensor_input("position_ids", i64, [BATCH, SEQ])]
    for i in range(cfg.layers):
        for kind in ("key", "value"):
            ios.append(tensor_input(f"past_key_values.{i}.{kind}", f32,
                                    [BATCH, cfg.kv_heads, PAST, cfg.head_dim]))
    return ios


def decoder_outputs(cfg: DecoderConfig) -> list[onnx.ValueInfoProto]:
    f32 = TensorProto.FLOAT
    ios = [tensor_input("logits", f32, [BATCH, SEQ, cfg.vocab])]
    for i in range(cfg.layers):
        for kind in ("key", "value"):
            ios.append(tensor_input(f"present.{i}.{kind}", f32,
                                    [BATCH, cfg.kv_heads, TOTAL, cfg.head_dim]))
    return ios


@dataclass(frozen=True)
class Common:
    """Values computed once per graph and shared by every layer."""

    batch_seq: str  # int64 [2]: (batch, seq), for head reshapes
    mask_bias: str  # float32 [batch, 1, seq, total]: 0 where attended, finfo.min elsewhere


def build_common(g: GraphBuilder) -> Common:
    """Causal + padding additive mask from attention_mask, as a plain exporter writes it."""
    ids_shape = g.op("Shape", "input_ids")
    batch_seq = g.op("Slice", ids_shape, g.ints(0), g.ints(2))
    seq = g.op("Gather", ids_shape, g.const(np.int64(1)), axis=0)
    total = g.op("Gather", g.op("Shape", "attention_mask"), g.const(np.int64(1)), axis=0)
    past = g.op("Sub", total, seq)
    zero, one = g.const(np.int64(0)), g.const(np.int64(1))
    key_pos = g.op("Range", zero, total, one)  # [total]
    query_pos = g.op("Range", past, total, one)  # [seq]
    future = g.op("Less", g.op("Unsqueeze", query_pos, g.ints(1)),
                  g.op("Unsqueeze", key_pos, g.ints(0)))  # [seq, total]: key after query
    padded = g.op("Equal", "attention_mask", g.const(np.int64(0)))  # [batch, total]
    masked = g.op("Or", g.op("Unsqueeze", future, g.ints(0, 1)),
                  g.op("Unsqueeze", padded, g.ints(1, 2)))  # [batch, 1, seq, total]
    bias = g.op("Where", masked, g.const(np.float32(MASK_MIN)), g.const(np.float32(0.0)))
    return Common(batch_seq=batch_seq, mask_bias=bias)


def split_heads(g: GraphBuilder, x: str, c: Common, heads: int, head_dim: int) -> str:
    """[batch, seq, heads*head_dim] -> [batch, heads, seq, head_dim]."""
    shape = g.op("Concat", c.batch_seq, g.ints(heads, head_dim), axis=0)
    return g.op("Transpose", g.op("Reshape", x, shape), perm=[0, 2, 1, 3])


def merge_heads(g: GraphBuilder, x: str, c: Common, hidden: int) -> str:
    """[batch, heads, seq, head_dim] -> [batch, seq, heads*head_dim]."""
    shape = g.op("Concat", c.batch_seq, g.ints(hidden), axis=0)
    return g.op("Reshape", g.op("Transpose", x, perm=[0, 2, 1, 3]), shape)


def repeat_kv(g: GraphBuilder, x: str, n_rep: int, heads: int) -> str:
    """GQA: [batch, kv, total, d] -> [batch, kv*n_rep, total, d] via Unsqueeze/Expand/Reshape."""
    if n_rep == 1:
        return x
    shape = g.op("Shape", x)
    lead, tail = g.op("Slice", shape, g.ints(0), g.ints(2)), g.op("Slice", shape, g.ints(2),
                                                                   g.ints(4))
    expanded = g.op("Expand", g.op("Unsqueeze", x, g.ints(2)),
                    g.op("Concat", lead, g.ints(n_rep), tail, axis=0))
    batch = g.op("Slice", shape, g.ints(0), g.ints(1))
    return g.op("Reshape", expanded, g.op("Concat", batch, g.ints(heads), tail, axis=0))


def attention_core(g: GraphBuilder, q: str, k: str, v: str, c: Common, head_dim: int) -> str:
    """softmax(q k^T / sqrt(d) + mask) v on [batch, heads, *, d] tensors."""
    scores = g.op("MatMul", q, g.op("Transpose", k, perm=[0, 1, 3, 2]))
    scores = g.op("Mul", scores, g.const(np.float32(1.0 / np.sqrt(head_dim))))
    probs = g.op("Softmax", g.op("Add", scores, c.mask_bias), axis=-1)
    return g.op("MatMul", probs, v)


def kv_with_past(g: GraphBuilder, layer: int, k: str, v: str) -> tuple[str, str]:
    """Concatenate the new keys/values after the past ones; the results are graph outputs."""
    outs = []
    for kind, new in (("key", k), ("value", v)):
        out = f"present.{layer}.{kind}"
        g.nodes.append(onnx.helper.make_node(
            "Concat", [f"past_key_values.{layer}.{kind}", new], [out], name=f"/{out}", axis=2))
        outs.append(out)
    return outs[0], outs[1]


def linear(g: GraphBuilder, x: str, prefix: str, k: int, n: int, bias: bool) -> str:
    """x @ W[k, n] (+ b): the weight is stored [in, out] as MatMul's B under `{prefix}.weight`."""
    y = g.op("MatMul", x, g.weight(f"{prefix}.weight", (k, n)))
    return g.op("Add", y, g.weight(f"{prefix}.bias", (n,))) if bias else y


def tied_lm_head(g: GraphBuilder, x: str, embed: str) -> str:
    return g.op("MatMul", x, g.op("Transpose", embed, perm=[1, 0]))


def emit_logits(g: GraphBuilder, x: str) -> None:
    """Rename the value `x` (produced by the last node) to the graph output `logits`."""
    node = g.nodes[-1]
    assert list(node.output) == [x], f"logits must come from the last node, got {node.output}"
    node.output[0] = "logits"
