"""Named decoder configs with seeded random weights; graphs can be written without the weights.

`write_synthetic(name, out, seed=0, weights=False)` writes model.onnx (every weight declared as
external data in model.onnx.data) and config.json; the data file is written only when asked
(`weights=True` or `write_weights(out, seed)` later). Each tensor is drawn from its own generator
seeded by (seed, crc32(name)), so tensors are reproducible one at a time, in any order.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx

from kiln.models.config import DecoderConfig
from kiln.models.gpt2_builder import build_gpt2
from kiln.models.llama_builder import build_llama
from kiln.models.onnx_graph import GraphBuilder

MODEL_FILE, DATA_FILE, CONFIG_FILE = "model.onnx", "model.onnx.data", "config.json"
STD = 0.02

CONFIGS: dict[str, DecoderConfig] = {
    "llama-tiny": DecoderConfig(family="llama", hidden=64, layers=2, heads=4, kv_heads=2,
                                head_dim=16, ffn=128, vocab=256, tie_embeddings=False),
    "qwen2-tiny": DecoderConfig(family="llama", hidden=64, layers=2, heads=4, kv_heads=2,
                                head_dim=16, ffn=128, vocab=256, rope_theta=1e6,
                                norm_eps=1e-6, attention_bias=True),
    "smollm2-135m": DecoderConfig(family="llama", hidden=576, layers=30, heads=9, kv_heads=3,
                                  head_dim=64, ffn=1536, vocab=49152, rope_theta=100000.0),
    # shape of Llama 3.2 1B (its llama3 RoPE frequency scaling is not modelled)
    "llama-3.2-1b": DecoderConfig(family="llama", hidden=2048, layers=16, heads=32, kv_heads=8,
                                  head_dim=64, ffn=8192, vocab=128256, rope_theta=500000.0),
    "gpt2-tiny": DecoderConfig(family="gpt2", hidden=64, layers=2, heads=4, kv_heads=4,
                               head_dim=16, ffn=256, vocab=256, max_positions=256),
    "gpt2-small": DecoderConfig(family="gpt2", hidden=768, layers=12, heads=12, kv_heads=12,
                                head_dim=64, ffn=3072, vocab=50257, max_positions=1024),
}

BUILDERS = {"llama": build_llama, "gpt2": build_gpt2}


def resolve(name_or_config: str | DecoderConfig) -> DecoderConfig:
    if isinstance(name_or_config, DecoderConfig):
        return name_or_config
    if name_or_config not in CONFIGS:
        raise KeyError(f"unknown synthetic config {name_or_config!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name_or_config]


def build_graph(config: DecoderConfig) -> tuple[GraphBuilder, onnx.ModelProto]:
    return BUILDERS[config.family](config, DATA_FILE)


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Normal * 0.02; norm scales are 1 + that (biases, including LayerNorm's, stay small)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(STD)
    is_norm_scale = name.endswith(".weight") and ("norm" in name or ".ln_" in name)
    return x + np.float32(1.0) if is_norm_scale else x


def synthetic_weights(config: str | DecoderConfig, seed: int = 0
                      ) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every graph weight, in graph layout; `dict(...)` it for small models."""
    builder, _ = build_graph(resolve(config))
    for spec in builder.weights:
        yield spec.name, synthetic_tensor(spec.name, spec.shape, seed)


def write_synthetic(name_or_config: str | DecoderConfig, out_dir: Path | str, *, seed: int = 0,
                    weights: bool = False) -> Path:
    """Write model.onnx + config.json (and model.onnx.data if `weights`); returns model.onnx."""
    cfg, out = resolve(name_or_config), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.to_json(out / CONFIG_FILE)
    builder, proto = build_graph(cfg)
    path = builder.save(proto, out / MODEL_FILE)
    (out / "synthetic.json").write_text(json.dumps({"seed": seed}) + "\n")
    if weights:
        _write_data(builder, out, seed)
    return path


def write_weights(out_dir: Path | str, seed: int | None = None) -> Path:
    """Materialize model.onnx.data for a graph written earlier with `weights=False`."""
    out = Path(out_dir)
    if seed is None:
        seed = int(json.loads((out / "synthetic.json").read_text())["seed"])
    builder, _ = build_graph(DecoderConfig.from_json(out / CONFIG_FILE))
    return _write_data(builder, out, seed)


def _write_data(builder: GraphBuilder, out: Path, seed: int) -> Path:
    shapes = {s.name: s.shape for s in builder.weights}
    return builder.write_weights(out / DATA_FILE,
                                 lambda name: synthetic_tensor(name, shapes[name], seed))
