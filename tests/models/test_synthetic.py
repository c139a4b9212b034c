"""Synthetic configs: graphs build shapes-only, run in onnxruntime, and match transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from kiln.models.synthetic import CONFIGS, synthetic_weights, write_synthetic, write_weights
from tests.helpers import assert_close
from tests.models.ort_decode import empty_past, positions, session, step

TINY = ["llama-tiny", "qwen2-tiny", "gpt2-tiny"]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_graph_without_weights(name: str, tmp_path: Path) -> None:
    path = write_synthetic(name, tmp_path, seed=0, weights=False)
    assert not (tmp_path / "model.onnx.data").exists()
    model = onnx.load(str(path), load_external_data=False)
    external = [t for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    cfg = CONFIGS[name]
    n_params = sum(int(np.prod(t.dims)) for t in external)
    assert n_params > cfg.layers * 4 * cfg.hidden * cfg.head_dim
    assert {n.domain for n in model.graph.node} == {""}, "no contrib ops"
    assert path.stat().st_size < 1_000_000


def test_weights_are_deterministic(tmp_path: Path) -> None:
    a, b = dict(synthetic_weights("llama-tiny", 3)), dict(synthetic_weights("llama-tiny", 3))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    c = dict(synthetic_weights("llama-tiny", 4))
    assert not np.array_equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    norm = a["model.layers.0.input_layernorm.weight"]
    assert abs(float(norm.mean()) - 1.0) < 0.01


@pytest.mark.parametrize("name", TINY)
def test_prefill_then_decode_equals_prefill(name: str, tmp_path: Path) -> None:
    """Late weight materialization; KV cache and left padding are consistent."""
    write_synthetic(name, tmp_path, seed=1, weights=False)
    write_weights(tmp_path)
    sess = session(tmp_path / "model.onnx")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CONFIGS[name].vocab, (1, 6))
    full, _ = step(sess, ids, np.ones_like(ids), empty_past(sess, 1))
    _, past = step(sess, ids[:, :4], np.ones((1, 4), np.int64), empty_past(sess, 1))
    tail, _ = step(sess, ids[:, 4:], np.ones((1, 6), np.int64), past)
    assert_close(tail, full[:, 4:], rtol=1e-4, atol=1e-5, name="decode vs prefill")
    padded = np.concatenate([np.zeros((1, 2), np.int64), ids], axis=1)
    mask = np.concatenate([np.zeros((1, 2), np.int64), np.ones_like(ids)], axis=1)
    left, _ = step(sess, padded, mask, empty_past(sess, 1))
    assert_close(left[:, 2:], full, rtol=1e-4, atol=1e-5, name="left padded")


def _hf_model(name: str, weights: dict[str, np.ndarray]):
    """The transformers model with the synthetic weights (linear weights back to [out, in])."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = CONFIGS[name]
    if c.family == "gpt2":
        config = transformers.GPT2Config(vocab_size=c.vocab, n_embd=c.hidden, n_layer=c.layers,
                                         n_head=c.heads, n_inner=c.ffn,
                                         n_positions=c.max_positions,
                                         layer_norm_epsilon=c.norm_eps)
        state = weights  # GPT-2's Conv1D weights are [in, out] already
    else:
        kind = "qwen2" if c.attention_bias else "llama"
        config = transformers.AutoConfig.for_model(
            kind, vocab_size=c.vocab, hidden_size=c.hidden, num_hidden_layers=c.layers,
            num_attention_heads=c.heads, num_key_value_heads=c.kv_heads, head_dim=c.head_dim,
            intermediate_size=c.ffn, rope_theta=c.rope_theta, rms_norm_eps=c.norm_eps,
            tie_word_embeddings=c.tie_embeddings)
        state = {k: (v.T if v.ndim == 2 and "embed" not in k else v) for k, v in weights.items()}
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=False)
    assert not unexpected and all("lm_head" in k or "attn.bias" in k for k in missing), missing
    model.tie_weights()
    return model


@pytest.mark.parametrize("name", TINY)
def test_matches_transformers(name: str, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    model = _hf_model(name, dict(synthetic_weights(name, 5)))
    sess = session(write_synthetic(name, tmp_path, seed=5, weights=True))
    ids = np.random.default_rng(1).integers(0, CONFIGS[name].vocab, (2, 5))
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    logits, _ = step(sess, ids, mask, empty_past(sess, 2))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions(mask, 5))).logits.numpy()
    valid = mask.astype(bool)
    assert_close(logits[valid], ref[valid], rtol=1e-3, atol=1e-4, name=name)
