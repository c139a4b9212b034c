"""The int8 KV cache (`--quant kv8`): compiled kernels against the interpreter running the same
kv8 graph (tight), against onnxruntime's fp32 (loose: the rounding of K and V), and decode
continuing a prefill exactly as the quantized graph does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.interpreter import run
from kiln.compiler.interpreter.transformer_ops import kv8_roundtrip
from kiln.runtime.session import Session
from tests.helpers import assert_close

pytestmark = pytest.mark.tvm

DATA = Path(__file__).parent.parent / "data"
MAX_SEQ = 96


@pytest.fixture(scope="module", params=["llama-optimum", "qwen2-dynamo"])
def kv8(request, tmp_path_factory):
    """(fixture name, kv8 artifact, the kv8 canonical graph the interpreter runs)."""
    from kiln.compiler.compile import compile_graph, compile_model
    from kiln.passes.quantize import parse_preset

    model = DATA / f"{request.param}.onnx"
    out = compile_model(model, tmp_path_factory.mktemp("kv8") / "art", max_seq=MAX_SEQ,
                        quant="kv8")
    graph = compile_graph(model, max_seq=MAX_SEQ, progress=lambda m: None,
                          weights_optional=False, quant=parse_preset("kv8"))
    return request.param, out, graph


def interpret(graph, ids: np.ndarray, past: dict | None, past_len: int) -> dict:
    b, s = ids.shape
    feeds = {"input_ids": ids, "attention_mask": np.ones((b, past_len + s), np.int64),
             "position_ids": np.broadcast_to(np.arange(past_len, past_len + s), (b, s)).copy()}
    for name in graph.inputs:
        if name.startswith("past_key_values"):
            kvh, d = (int(x) for x in graph.types[name].shape[1::2])
            feeds[name] = (past[name.replace("past_key_values", "present")] if past else
                           np.zeros((b, kvh, 0, d), np.float32))
    return run(graph, {k: v for k, v in feeds.items() if k in graph.inputs},
               outputs=list(graph.outputs))


def test_roundtrip_is_int8_per_row():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 64)).astype(np.float32)
    y = kv8_roundtrip(x)
    scale = np.abs(x).max(-1, keepdims=True) / 127
    q = y / scale
    assert np.abs(q - np.rint(q)).max() < 1e-3 and np.abs(q).max() <= 127.001
    assert np.abs(y - x).max() <= scale.max() / 2 * 1.001
    assert not kv8_roundtrip(np.zeros((1, 4), np.float32)).any()


def test_manifest_declares_int8_cache(kv8):
    _, art, _ = kv8
    caches = Session.load(art).caches_spec
    assert {c["dtype"] for c in caches} == {"int8", "float32"}
    assert all(c["head_dim"] == 1 for c in caches if c["dtype"] == "float32")


def test_prefill_and_decode_match_the_kv8_graph(kv8, rng):
    name, art, graph = kv8
    session = Session.load(art)
    ids = rng.integers(0, 256, (1, 23))
    ref = interpret(graph, ids, None, 0)
    assert_close(session.prefill(ids), ref["logits"], rtol=1e-4, atol=1e-4,
                 name=f"{name} kv8 prefill")
    past, n = ref, ids.shape[1]
    for _ in range(5):  # decode reads the int8 cache the prefill wrote
        tok = np.array([[int(past["logits"][0, -1].argmax())]])
        got = session.decode(tok)
        past = interpret(graph, tok, past, n)
        n += 1
        assert_close(got, past["logits"], rtol=1e-4, atol=1e-4, name=f"{name} kv8 decode")


def test_kv8_stays_close_to_fp32(kv8, rng):
    """int8 rows cost about 0.4% of each row's absmax: logits move little, argmax rarely."""
    from tests.runtime.test_runtime import ort_logits

    name, art, _ = kv8
    ids = rng.integers(0, 256, (1, 48))
    got = Session.load(art).prefill(ids)[0]
    want = ort_logits(DATA / f"{name}.onnx", ids)["logits"][0]
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel < 0.05, f"{name}: kv8 logits rel err {rel:.3g} vs fp32"
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
