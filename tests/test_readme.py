"""README.md's Python blocks run as written, on a tiny model placed where the quickstart's is.

The blocks compile `out/smollm2/model.onnx` (the quickstart's export of the real SmolLM2). The
test runs them, unchanged and in order in one namespace, from a temporary folder where
out/smollm2/model.onnx is the committed tiny Llama fixture (tests/data/llama-optimum.onnx, vocab
256) with a byte-level tokenizer.json beside it (one token per byte: ids 0-255). The tokens the
first block generates are checked against onnxruntime's greedy decoding of the same ONNX file.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.runtime.test_runtime import ort_greedy

pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "llama-optimum.onnx"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def byte_tokenizer(path: Path) -> None:
    """A byte-level BPE without merges: every byte is one token, text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))},
                                     merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path))


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenizers import Tokenizer

    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2, "the README's Python API section has lost its examples"
    model = tmp_path / "out" / "smollm2" / "model.onnx"
    model.parent.mkdir(parents=True)
    shutil.copy(FIXTURE, model)
    byte_tokenizer(model.parent / "tokenizer.json")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)

    result = namespace["result"]
    tok = Tokenizer.from_file(str(model.parent / "tokenizer.json"))
    prompt = tok.encode("The capital of France is").ids
    assert len(prompt) == len("The capital of France is")  # bytes, as promised above
    want = ort_greedy(model, np.array([prompt]), len(result.tokens))
    assert result.tokens == want
    assert len(result.tokens) == 32 or result.stopped == "stop token"
    assert result.text == tok.decode(result.tokens)
    assert (tmp_path / "out" / "smollm2.kiln" / "manifest.json").is_file()
