"""Tiny seeded exports of many transformers architectures, to try `kiln check` beyond the fixtures.

Run: `python -m kiln.models.zoo OUT_DIR [names...]`. Writes `{name}-optimum.onnx` per family
(and `{name}-dynamo.onnx` for the families in DYNAMO) with weights embedded, plus MANIFEST.json
with configs, versions, sha256 and, for a failed export, its error.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from kiln.models.fixtures import _sha256, _versions

SEED = 0
COMMON = dict(vocab_size=128, max_position_embeddings=128, initializer_range=0.1)
#: the usual small decoder: hidden 32, 2 layers, 4 heads (2 KV heads), FFN 64
DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, **COMMON)
IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

#: name -> transformers config (model_type first); architecture notes in comments
ZOO: dict[str, dict[str, Any]] = {
    "mistral": dict(model_type="mistral", **DECODER, **IDS),
    # partial rotary, parallel attention + MLP, biases, gelu_new; no GQA: optimum's dummy past
    # for phi has num_attention_heads heads ("Sizes of tensors must match" in the cache update)
    "phi": dict(model_type="phi", **{**DECODER, "num_key_value_heads": 4},
                partial_rotary_factor=0.5, hidden_act="gelu_new", **IDS),
    # fused qkv_proj and gate_up_proj
    "phi3": dict(model_type="phi3", **DECODER, **IDS),
    # partial rotary, parallel residual; no GQA
    "gpt_neox": dict(model_type="gpt_neox", **{**DECODER, "num_key_value_heads": 4},
                     rotary_pct=0.5, use_parallel_residual=True, **IDS),
    # norm weight 1 + w, embedding * sqrt(hidden), GELU-tanh gate, head_dim 16 != 32 / 4
    "gemma": dict(model_type="gemma", **DECODER, head_dim=16,
                  hidden_activation="gelu_pytorch_tanh", **IDS),
    # gemma + sandwich norms, logit softcapping, query_pre_attn_scalar, sliding window
    "gemma2": dict(model_type="gemma2", **DECODER, head_dim=16, query_pre_attn_scalar=16,
                   sliding_window=4, **IDS),
    # q_norm / k_norm per head
    "qwen3": dict(model_type="qwen3", **DECODER, head_dim=8, **IDS),
    # ReLU, learned positions with offset 2, LayerNorm
    "opt": dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                ffn_dim=64, word_embed_proj_dim=32, **COMMON, bos_token_id=2, eos_token_id=2,
                pad_token_id=1),
    # multi-query, parallel attention, no ALiBi
    "falcon": dict(model_type="falcon", hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, multi_query=True, parallel_attn=True, alibi=False,
                   new_decoder_architecture=False, bias=False, vocab_size=128,
                   initializer_range=0.1, max_position_embeddings=128, bos_token_id=1,
                   eos_token_id=2),
    # interleaved (adjacent-pair) rotary on the first rotary_dim channels
    "gptj": dict(model_type="gptj", n_embd=32, n_layer=2, n_head=4, n_inner=64, rotary_dim=4,
                 n_positions=128, vocab_size=128, initializer_range=0.1, bos_token_id=1,
                 eos_token_id=2),
    # partial rotary + LayerNorm
    "stablelm": dict(model_type="stablelm", **DECODER, partial_rotary_factor=0.5, **IDS),
    # ALiBi, LayerNorm after the embedding
    "bloom": dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=128,
                  initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # llama with embedding / residual / attention multipliers and logits scaling
    "granite": dict(model_type="granite", **DECODER, embedding_multiplier=2.0,
                    residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0,
                    **IDS),
    # non-parametric LayerNorm, optional qkv clipping
    "olmo": dict(model_type="olmo", **DECODER, clip_qkv=4.0, **IDS),
    # encoder: token types, learned positions, post-LayerNorm, GELU; no KV cache
    "bert": dict(model_type="bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, **COMMON, type_vocab_size=2, pad_token_id=0),
}
#: more families optimum exports (beyond the list the acceptance names)
ZOO |= {
    # multi-query attention with a fused c_attn, GPT-2 style otherwise
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=32, n_layer=2, n_head=4, n_inner=64,
                        n_positions=128, vocab_size=128, initializer_range=0.1,
                        multi_query=True, bos_token_id=1, eos_token_id=2),
    # alternating global / local (windowed) attention, unscaled scores
    "gpt_neo": dict(model_type="gpt_neo", hidden_size=32, num_layers=2, num_heads=4,
                    attention_types=[[["global", "local"], 1]], window_size=4,
                    intermediate_size=64, **COMMON, bos_token_id=1, eos_token_id=2),
    # fused qkv in an mp_num-blocked layout, interleaved partial rotary, parallel residual
    "codegen": dict(model_type="codegen", n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                    n_inner=64, n_positions=128, n_ctx=128, vocab_size=128,
                    initializer_range=0.1, bos_token_id=1, eos_token_id=2),
    # ALiBi, no biases, LayerNorm without bias
    "mpt": dict(model_type="mpt", d_model=32, n_heads=4, n_layers=2, expansion_ratio=2,
                max_seq_len=128, vocab_size=128, initializer_range=0.1),
    # parallel attention + MLP, LayerNorm without bias, logit scale, interleaved rotary
    "cohere": dict(model_type="cohere", **DECODER, logit_scale=0.5, **IDS),
    # sliding + full layers, q/k norms, four norms per layer
    "gemma3_text": dict(model_type="gemma3_text", **DECODER, head_dim=16,
                        query_pre_attn_scalar=16, sliding_window=4,
                        layer_types=["sliding_attention", "full_attention"], **IDS),
    # q/k norms over all heads, post-norms
    "olmo2": dict(model_type="olmo2", **DECODER, **IDS),
    # relu^2 MLP without gate, LayerNorm with 1 + w, partial rotary
    "nemotron": dict(model_type="nemotron", **DECODER, partial_rotary_factor=0.5,
                     head_dim=8, **IDS),
    # mixture of experts (4 experts, top-2) with q/k norms
    "qwen3_moe": dict(model_type="qwen3_moe", **DECODER, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, **IDS),
    # some layers without rotary (NoPE)
    "smollm3": dict(model_type="smollm3", **DECODER, no_rope_layer_interval=2, **IDS),
    "helium": dict(model_type="helium", **DECODER, head_dim=8, **IDS),
    # interleaved partial rotary, fused gate_up
    "glm": dict(model_type="glm", **DECODER, head_dim=8, partial_rotary_factor=0.5, **IDS),
    # up/down MLP with ReLU^2
    "arcee": dict(model_type="arcee", **DECODER, **IDS),
}
ENCODERS = {"bert"}
#: families also exported with torch.onnx (dynamo)
DYNAMO = ("mistral", "phi3", "gemma", "qwen3", "bloom")


def tiny_model(name: str, seed: int = SEED) -> Any:
    """The seeded random-weight transformers model of one zoo entry (fp32, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    spec = dict(ZOO[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    auto = AutoModel if name in ENCODERS else AutoModelForCausalLM
    return auto.from_config(config, torch_dtype=torch.float32).eval()


def export_optimum(hf_dir: Path, out: Path, task: str) -> Path:
    """optimum's export of a saved model folder (opset 18, no validation run)."""
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        main_export(str(hf_dir), tmp, task=task, opset=18, local_files_only=True,
                    do_validation=False)
        shutil.copyfile(Path(tmp) / "model.onnx", out)
    return out


def _entry(name: str, exporter: str, path: Path | None, error: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"file": path.name if path else None, "family": name,
                             "exporter": exporter, "config": ZOO[name], "seed": SEED}
    if path is not None:
        entry |= {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    if error is not None:
        entry["error"] = error
    return entry


def _attempt(name: str, exporter: str, fn: Any, out: Path) -> dict[str, Any]:
    try:
        return _entry(name, exporter, fn(out), None)
    except Exception as e:  # record any exporter failure and go on with the next family
        traceback.print_exc()
        return _entry(name, exporter, None, f"{type(e).__name__}: {str(e).strip()[:500]}")


def build(name: str, out_dir: Path) -> list[dict[str, Any]]:
    """Export one zoo entry with optimum (and dynamo where listed); one manifest entry each."""
    from kiln.models.dynamo_export import export_dynamo

    model = tiny_model(name)
    task = "feature-extraction" if name in ENCODERS else "text-generation-with-past"
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / f"{name}-hf"
        model.save_pretrained(hf_dir, safe_serialization=True)
        entries.append(_attempt(name, "optimum", lambda p: export_optimum(hf_dir, p, task),
                                out_dir / f"{name}-optimum.onnx"))
    if name in DYNAMO:
        entries.append(_attempt(name, "dynamo", lambda p: export_dynamo(model, p),
                                out_dir / f"{name}-dynamo.onnx"))
    return entries


def main(out_dir: str | Path, names: list[str] | None = None) -> Path:
    """Build the named entries (all by default) into out_dir; merge them into its manifest."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "MANIFEST.json"
    old = json.loads(manifest.read_text())["files"] if manifest.is_file() else []
    names = names or list(ZOO)
    entries = [e for e in old if e["family"] not in names]
    entries += [e for name in names for e in build(name, out)]
    manifest.write_text(json.dumps({"versions": _versions(), "files": entries}, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "zoo", sys.argv[2:] or None)
