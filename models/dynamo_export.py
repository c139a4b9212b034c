"""Export a transformers causal LM with `torch.onnx.export(dynamo=True)` and optimum's I/O names.

Flat past tensors are wrapped into a DynamicCache inside a wrapper module; dynamic shapes are
nested like the arguments; the example batch is 2 so batch is not specialized to 1. Symbolic dim
names chosen by torch are renamed to optimum's afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import torch
from transformers import DynamicCache

from kiln.models.decoder_parts import BATCH, PAST, SEQ, TOTAL, io_names


class FlatPastDecoder(torch.nn.Module):
    """(input_ids, attention_mask, position_ids, past tuple) -> (logits, *present) flat."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.n_layers = model.config.num_hidden_layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple:
        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def example_inputs(config: Any, batch: int = 2, seq: int = 3, past: int = 4) -> tuple:
    n_layers, heads = config.num_hidden_layers, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq).repeat(batch, 1)
    kv = tuple(torch.randn(batch, kv_heads, past, head_dim, generator=gen)
               for _ in range(2 * n_layers))
    return ids, mask, pos, kv


def _dynamic_shapes(n_layers: int) -> tuple:
    dyn = torch.export.Dim.DYNAMIC
    seq_axes = {0: dyn, 1: dyn}
    return (seq_axes, seq_axes, seq_axes, tuple({0: dyn, 2: dyn} for _ in range(2 * n_layers)))


def rename_dims(model: onnx.ModelProto) -> None:
    """Replace torch's symbol names (s0, s1 + s2, ...) on graph I/O with optimum's dim names."""
    io = {v.name: v for v in [*model.graph.input, *model.graph.output]}

    def dim(name: str, axis: int) -> onnx.TensorShapeProto.Dimension:
        return io[name].type.tensor_type.shape.dim[axis]

    wanted = {(v.name, 0): BATCH for v in model.graph.input}
    wanted |= {(v.name, 2): PAST for v in model.graph.input if v.name.startswith("past_")}
    wanted |= {("input_ids", 1): SEQ, ("attention_mask", 1): TOTAL}
    symbols = {dim(n, a).dim_param: new for (n, a), new in wanted.items() if dim(n, a).dim_param}
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in symbols:
                d.dim_param = symbols[d.dim_param]
    for v in model.graph.output:
        if v.name.startswith("present."):
            dim(v.name, 2).dim_param = TOTAL


def strip_wrapper(model: onnx.ModelProto, prefix: str = "model.") -> None:
    """Drop torch's per-node debug metadata and the wrapper's prefix on parameter names."""
    renames = {i.name: i.name[len(prefix):] for i in model.graph.initializer
               if i.name.startswith(prefix)}
    for init in model.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]


def export_dynamo(model: Any, out: Path, opset: int = 18) -> Path:
    """Export with past key values; weights are embedded (fixtures are small)."""
    n_layers = model.config.num_hidden_layers
    inputs, outputs = io_names(n_layers)
    program = torch.onnx.export(
        FlatPastDecoder(model).eval(), example_inputs(model.config), dynamo=True,
        input_names=inputs, output_names=outputs, dynamic_shapes=_dynamic_shapes(n_layers),
        opset_version=opset, external_data=False)
    proto = program.model_proto
    rename_dims(proto)
    strip_wrapper(proto)
    onnx.save(proto, str(out))
    return out
