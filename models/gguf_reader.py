"""Read a llama-architecture GGUF: config from metadata, float32 weights in Hugging Face layout.

GGUF stores Q and K projection rows permuted for adjacent-pair RoPE (llama.cpp's convert script);
`unpermute_rope_rows` undoes that, giving the rotate-half layout the graph builders use.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from kiln.models.config import DecoderConfig

# Hugging Face suffix (per layer) -> GGUF tensor suffix
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: per head, rows (pair, 2) -> (2, pair) = rotate-half order."""
    out_dim = w.shape[0]
    return (w.reshape(n_heads, out_dim // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class GGUFModel:
    """A GGUF file opened for reading (memory-mapped; tensors dequantized on request)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.reader = GGUFReader(str(self.path))
        self.arch = str(self.meta("general.architecture"))
        if self.arch != "llama":
            raise ValueError(f"{self.path.name}: architecture {self.arch!r}, only 'llama' handled")
        self._tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def config(self) -> DecoderConfig:
        a = self.arch
        hidden, heads = int(self.meta(f"{a}.embedding_length")), int(
            self.meta(f"{a}.attention.head_count"))
        return DecoderConfig(
            family="llama", hidden=hidden, layers=int(self.meta(f"{a}.block_count")),
            heads=heads, kv_heads=int(self.meta(f"{a}.attention.head_count_kv", heads)),
            head_dim=int(self.meta(f"{a}.rope.dimension_count", hidden // heads)),
            ffn=int(self.meta(f"{a}.feed_forward_length")),
            vocab=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            rope_theta=float(self.meta(f"{a}.rope.freq_base", 10000.0)),
            # GGUF stores eps as float32; round to the value the checkpoint was trained with
            norm_eps=float(f"{float(self.meta(f'{a}.attention.layer_norm_rms_epsilon')):.6g}"),
            tie_embeddings="output.weight" not in self._tensors,
            max_positions=int(self.meta(f"{a}.context_length", 2048)))

    def raw(self, gguf_name: str) -> np.ndarray:
        """A tensor dequantized to float32 in numpy (row-major, torch-like) layout."""
        t = self._tensors[gguf_name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)

    def hf_tensor(self, hf_name: str) -> np.ndarray:
        """A weight under its Hugging Face name and layout ([out, in] for linear weights)."""
        if hf_name in _GLOBAL_NAMES:
            return self.raw(_GLOBAL_NAMES[hf_name])
        m = _LAYER_RE.fullmatch(hf_name)
        if not m or m.group(2) not in _LAYER_NAMES:
            raise KeyError(f"no GGUF tensor for {hf_name!r}")
        w = self.raw(f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}")
        cfg_heads = int(self.meta(f"{self.arch}.attention.head_count"))
        if m.group(2) == "self_attn.q_proj.weight":
            w = unpermute_rope_rows(w, cfg_heads)
        elif m.group(2) == "self_attn.k_proj.weight":
            w = unpermute_rope_rows(
                w, int(self.meta(f"{self.arch}.attention.head_count_kv", cfg_heads)))
        return w

    def graph_weights(self) -> Callable[[str], np.ndarray]:
        """Provider for the graph builders: linear weights transposed to [in, out]."""
        def provide(name: str) -> np.ndarray:
            w = self.hf_tensor(name)
            is_linear = w.ndim == 2 and name != "model.embed_tokens.weight"
            return np.ascontiguousarray(w.T) if is_linear else w
        return provide
