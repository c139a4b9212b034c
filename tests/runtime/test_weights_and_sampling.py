"""Parameters apart from kernels (--no-weights, convert, synthetic weights) and sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.sampling import Sampler

DATA = Path(__file__).parent.parent / "data"
MODEL = DATA / "llama-optimum.onnx"


@pytest.mark.tvm
def test_no_weights_then_convert_equals_full_compile(tmp_path, rng):
    from kiln.compiler.compile import compile_model, convert
    from kiln.runtime.session import Session

    full = compile_model(MODEL, tmp_path / "full", max_seq=64)
    bare = compile_model(MODEL, tmp_path / "bare", max_seq=64, weights=False)
    assert not (bare / af.PARAMS).exists()
    with pytest.raises(KilnError, match="compiled without weights"):
        Session.load(bare)
    ids = rng.integers(0, 256, (1, 9))
    synthetic = Session.load(bare, synthetic_weights=3).prefill(ids)
    again = Session.load(bare, synthetic_weights=3).prefill(ids)
    np.testing.assert_array_equal(synthetic, again)  # seeded: reproducible
    assert np.isfinite(synthetic).all() and synthetic.std() > 0
    convert(MODEL, bare)
    manifest = json.loads((bare / af.MANIFEST).read_text())
    assert af.PARAMS in manifest["files"]
    np.testing.assert_array_equal(Session.load(bare).prefill(ids),
                                  Session.load(full).prefill(ids))


@pytest.mark.tvm
def test_convert_refuses_a_different_model(tmp_path):
    from kiln.compiler.compile import compile_model, convert

    bare = compile_model(MODEL, tmp_path / "bare", max_seq=64, weights=False)
    with pytest.raises(KilnError, match=r"parameter .* the artifact expects"):
        convert(DATA / "gpt2-optimum.onnx", bare)


def test_manifest_describes_every_parameter(tmp_path):
    pytest.importorskip("tvm")
    from kiln.compiler.compile import compile_model

    art = compile_model(MODEL, tmp_path / "a", max_seq=32)
    m = json.loads((art / af.MANIFEST).read_text())
    assert m["format_version"] == af.FORMAT_VERSION and m["entry_points"][:2] == ["prefill",
                                                                                  "decode"]
    assert m["architecture"]["layers"] == 2 and m["kv_cache"]["capacity"] == 32
    names = [p["name"] for p in m["params"]]
    assert names == m["signature"]["params"]
    roles = {p["role"] for p in m["params"]}
    assert {"linear.weight", "rms_norm.norm.weight", "embedding.table"} <= roles
    derived = [p for p in m["params"] if p["derivation"]["kind"] == "derived"]
    assert derived and all(p["derivation"]["sources"] for p in derived)
    for name, digest in m["files"].items():
        assert af.sha256(art / name) == digest


# -- sampling -----------------------------------------------------------------------------------

def test_greedy_is_argmax(rng):
    logits = rng.standard_normal((3, 50))
    np.testing.assert_array_equal(Sampler()(logits, rng), logits.argmax(-1))


def test_top_k_and_top_p_restrict_support(rng):
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(Sampler(temperature=1.0, top_k=2, seed=s)(logits, np.random.default_rng(s))[0])
            for s in range(200)}
    assert seen == {0, 1}
    seen = {int(Sampler(temperature=1.0, top_p=0.7)(logits, np.random.default_rng(s))[0])
            for s in range(200)}
    assert seen == {0, 1}  # 0.5 + 0.3 covers 0.7


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    sampler = Sampler(temperature=1.0, seed=0)
    rng = sampler.generator()
    draws = [int(sampler(np.log(probs)[None], rng)[0]) for _ in range(4000)]
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.03)


def test_seeded_sampling_is_reproducible(rng):
    logits = rng.standard_normal((1, 100))
    a = [int(Sampler(temperature=0.8, top_k=20, seed=5)(logits, np.random.default_rng(5))[0])
         for _ in range(3)]
    assert len(set(a)) == 1


class _Scripted:
    """A stand-in session whose logits pick a scripted sequence of tokens."""

    def __init__(self, script, vocab=10, capacity=64):
        self.script, self.vocab, self.capacity, self.calls = list(script), vocab, capacity, []

    def _logits(self, s):
        out = np.zeros((1, s, self.vocab))
        out[0, -1, self.script.pop(0)] = 1.0
        return out

    def prefill(self, ids, last_only=False):
        self.calls.append(("prefill", ids.shape[1]))
        return self._logits(ids.shape[1])

    def decode(self, tokens):
        self.calls.append(("decode", 1))
        return self._logits(1)

    def decode_greedy(self, tokens):
        return self.decode(tokens)[:, -1].argmax(-1)


def test_generation_stops_at_a_stop_token():
    from kiln.runtime.generate import Generation, generate

    result = Generation()
    s = _Scripted([4, 5, 2, 7, 7])
    assert list(generate(s, [1, 2, 3], max_new_tokens=5, stop=[2], result=result)) == [4, 5, 2]
    assert result.stopped == "stop token" and s.calls[0] == ("prefill", 3)
    assert result.timing.prompt_tokens == 3 and result.timing.decode_tokens == 2


def test_generation_refuses_prompts_beyond_the_context():
    from kiln.runtime.generate import generate

    with pytest.raises(KilnError, match="prompt of 60 tokens \\+ 8 new tokens exceeds the "
                                        "context of 64"):
        list(generate(_Scripted([1] * 9), [1] * 60, max_new_tokens=8))
