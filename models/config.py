"""Architecture config shared by the ONNX graph builders, synthetic models and SmolLM2."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "gpt2"]


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a decoder-only transformer; `family` picks the graph builder.

    llama: RMSNorm, rotate-half RoPE, GQA, SiLU-gated MLP. gpt2: LayerNorm, learned positions,
    fused QKV, GELU-tanh MLP (`ffn` is the MLP width, `kv_heads == heads`).
    """

    family: Family
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (Qwen2 style); o_proj stays bias-free
    mlp_bias: bool = False
    max_positions: int = 2048  # used only by learned position embeddings (gpt2)

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} not a multiple of kv_heads {self.kv_heads}")
        if self.family == "gpt2" and self.heads * self.head_dim != self.hidden:
            raise ValueError("gpt2 needs heads * head_dim == hidden")

    def to_json(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @staticmethod
    def from_json(path: Path) -> DecoderConfig:
        return DecoderConfig(**json.loads(path.read_text()))

    def replace(self, **changes: Any) -> DecoderConfig:
        return dataclasses.replace(self, **changes)
