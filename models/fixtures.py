"""Tiny seeded Hugging Face decoders exported by optimum and by torch.onnx (dynamo) as test data.

Run: `python -m kiln.models.fixtures tests/data`. Writes, per family (llama, qwen2, gpt2):
`{family}-hf/` (config.json + model.safetensors, the reference), `{family}-optimum.onnx`,
`{family}-dynamo.onnx` (weights embedded), and MANIFEST.json with configs, versions and sha256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

SEED = 0
BATCH, SEQ, PAST = 2, 3, 4  # dynamo example shapes: batch >= 2 and distinct so none specializes
COMMON = dict(vocab_size=256, max_position_embeddings=256, initializer_range=0.1)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **COMMON),
    "qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, **COMMON),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_inner=128,
                 n_positions=256, vocab_size=256, initializer_range=0.1, bos_token_id=0,
                 eos_token_id=0),
}


def tiny_model(family: str, seed: int = SEED) -> Any:
    """The seeded random-weight transformers model of one family (fp32, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()


def export_optimum(hf_dir: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        main_export(str(hf_dir), tmp, task="text-generation-with-past", opset=18,
                    local_files_only=True)
        shutil.copyfile(Path(tmp) / "model.onnx", out)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {p: version(p) for p in ("torch", "transformers", "optimum", "optimum-onnx", "onnx",
                                     "onnxscript", "onnxruntime")}


def build_family(family: str, out_dir: Path) -> list[dict[str, Any]]:
    from kiln.models.dynamo_export import export_dynamo

    model = tiny_model(family)
    hf_dir = out_dir / f"{family}-hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    (hf_dir / "generation_config.json").unlink(missing_ok=True)
    entries = []
    for exporter, fn in (("optimum", lambda p: export_optimum(hf_dir, p)),
                         ("dynamo", lambda p: export_dynamo(model, p))):
        path = fn(out_dir / f"{family}-{exporter}.onnx")
        entries.append({"file": path.name, "family": family, "exporter": exporter,
                        "reference": hf_dir.name, "config": FAMILIES[family], "seed": SEED,
                        "bytes": path.stat().st_size, "sha256": _sha256(path)})
    weights = hf_dir / "model.safetensors"
    entries.append({"file": f"{hf_dir.name}/{weights.name}", "family": family,
                    "exporter": "transformers.save_pretrained", "config": FAMILIES[family],
                    "seed": SEED, "bytes": weights.stat().st_size, "sha256": _sha256(weights)})
    return entries


def main(out_dir: str | Path, families: list[str] | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [e for fam in families or list(FAMILIES) for e in build_family(fam, out)]
    manifest = out / "MANIFEST.json"
    manifest.write_text(json.dumps({"versions": _versions(), "files": entries}, indent=2) + "\n")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data", sys.argv[2:] or None)
