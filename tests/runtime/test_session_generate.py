"""Session.generate, the Python API's one-call generation: token-id prompts, stop tokens,
sampling options, and the error for a text prompt without a tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime.generate import generate
from kiln.runtime.sampling import Sampler
from kiln.runtime.session import Session
from tests.runtime.test_runtime import ort_greedy

pytestmark = pytest.mark.tvm

MODEL = Path(__file__).parent.parent / "data" / "llama-optimum.onnx"


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Session:
    from kiln.compiler.compile import compile_model

    return Session.load(compile_model(MODEL, tmp_path_factory.mktemp("art") / "a", max_seq=64))


def test_token_prompt_greedy_matches_onnxruntime(session, rng):
    prompt = [int(t) for t in rng.integers(3, 256, 6)]
    result = session.generate(prompt, max_new_tokens=12, stop=())
    assert result.tokens == ort_greedy(MODEL, np.array([prompt]), 12)
    assert result.stopped == "length" and result.text is None  # no tokenizer.json here
    assert result.timing.prompt_tokens == 6 and result.timing.decode_tokens == 11


def test_stop_tokens_end_generation(session, rng, monkeypatch):
    prompt = [int(t) for t in rng.integers(3, 256, 6)]
    free = session.generate(prompt, max_new_tokens=12, stop=())
    stop = free.tokens[4]
    first = free.tokens.index(stop)
    stopped = session.generate(prompt, max_new_tokens=12, stop=[stop])
    assert stopped.tokens == free.tokens[:first + 1] and stopped.stopped == "stop token"
    # by default, the stop tokens the manifest records (kiln.runtime.cli.stop_tokens)
    monkeypatch.setitem(session.artifact.manifest, "stop_token_ids", [stop])
    assert session.generate(prompt, max_new_tokens=12).tokens == stopped.tokens


def test_sampling_options_reach_the_loop(session, rng):
    prompt = [int(t) for t in rng.integers(3, 256, 6)]
    got = session.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9,
                           seed=7, stop=())
    sampler = Sampler(temperature=0.8, top_k=20, top_p=0.9, seed=7)
    assert got.tokens == list(generate(session, prompt, max_new_tokens=10, sampler=sampler))
    other = session.generate(prompt, max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9,
                             seed=8, stop=())
    assert other.tokens != got.tokens  # the seed is used (10 draws from a 20-token nucleus)


def test_text_prompt_needs_a_tokenizer(session):
    with pytest.raises(KilnError, match=r"no tokenizer\.json"):
        session.generate("hello", max_new_tokens=2)
