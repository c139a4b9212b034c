"""SmolLM2 through the Hugging Face route: GGUF -> transformers -> optimum ONNX (offline)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from kiln.models.smollm2 import GGUF_NAME, gguf_path


def load_transformers_smollm2():  # -> transformers.PreTrainedModel (import kept lazy)
    """The GGUF dequantized by transformers' own GGUF loader (fp32, eval mode)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path().parent), gguf_file=GGUF_NAME)
    return model.float().eval()


def load_transformers_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path().parent), gguf_file=GGUF_NAME)


def export_smollm2_optimum(cache_dir: Path | str) -> Path:
    """optimum `text-generation-with-past` export of SmolLM2 into cache_dir; returns model.onnx.

    Skipped when cache_dir/model.onnx already exists.
    """
    out = Path(cache_dir)
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        load_transformers_smollm2().save_pretrained(hf_dir)
        load_transformers_tokenizer().save_pretrained(hf_dir)
        staging = Path(tmp) / "onnx"
        main_export(str(hf_dir), staging, task="text-generation-with-past",
                    local_files_only=True, do_validation=False)
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():  # model.onnx last, so a partial copy is never "done"
            if item.name != "model.onnx":
                shutil.copy2(item, out / item.name)
        shutil.copy2(staging / "model.onnx", out / "model.onnx")
    return out / "model.onnx"
