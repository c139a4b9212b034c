"""Committed fixtures (optimum and torch dynamo exports) run in onnxruntime like transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.helpers import assert_close
from tests.models.ort_decode import empty_past, positions, session, step

DATA = Path(__file__).resolve().parents[1] / "data"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())
EXPORTS = [e for e in MANIFEST["files"] if e["exporter"] in ("optimum", "dynamo")]
TOL = dict(rtol=1e-3, atol=1e-4)


def _ids(entry: dict) -> str:
    return entry["file"]


def _inputs(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batch 2, row 1 left-padded by two; then two decode tokens per row."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(3, vocab, (2, 5))
    mask = np.ones((2, 5), np.int64)
    mask[1, :2] = 0
    return prompt, mask, rng.integers(3, vocab, (2, 2))


def _torch_reference(hf_dir: Path, prompt, mask, new) -> tuple[np.ndarray, np.ndarray]:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()  # noqa: E731
    with torch.no_grad():
        first = model(input_ids=t(prompt), attention_mask=t(mask),
                      position_ids=t(positions(mask, 5)), use_cache=True)
        second = model(input_ids=t(new), attention_mask=t(full_mask),
                       position_ids=t(positions(full_mask, 2)),
                       past_key_values=first.past_key_values, use_cache=True)
    return first.logits.numpy(), second.logits.numpy()


@pytest.mark.parametrize("entry", EXPORTS, ids=_ids)
def test_fixture_matches_transformers(entry: dict) -> None:
    sess = session(DATA / entry["file"])
    vocab = entry["config"]["vocab_size"]
    prompt, mask, new = _inputs(vocab)
    logits, past = step(sess, prompt, mask, empty_past(sess, 2))
    full_mask = np.concatenate([mask, np.ones_like(new)], axis=1)
    logits2, present = step(sess, new, full_mask, past)
    assert present["past_key_values.0.key"].shape[2] == 7
    ref1, ref2 = _torch_reference(DATA / entry["reference"], prompt, mask, new)
    valid = mask.astype(bool)  # padded query rows are fully masked: their logits are arbitrary
    assert_close(logits[valid], ref1[valid], name=f"{entry['file']} prefill", **TOL)
    assert_close(logits2, ref2, name=f"{entry['file']} decode", **TOL)


def _io(path: Path) -> dict[str, list]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*g.input, *g.output]}


@pytest.mark.parametrize("family", sorted({e["family"] for e in EXPORTS}))
def test_exporters_share_io(family: str) -> None:
    """The dynamo export was renamed to optimum's I/O names and dim names (order may differ)."""
    optimum, dynamo = (_io(DATA / f"{family}-{x}.onnx") for x in ("optimum", "dynamo"))
    assert dynamo == optimum
    assert optimum["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]


def test_manifest_checksums() -> None:
    import hashlib

    for entry in MANIFEST["files"]:
        digest = hashlib.sha256((DATA / entry["file"]).read_bytes()).hexdigest()
        assert digest == entry["sha256"], entry["file"]
