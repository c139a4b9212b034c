"""Acceptance on the real SmolLM2-135M-Instruct: kiln's export and optimum's export of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from kiln.compiler.cli import main
from kiln.compiler.driver import canonicalize
from kiln.compiler.frontend.feeds import make_feeds
from kiln.compiler.interpreter import run

pytestmark = pytest.mark.slow


def _kiln(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _assert_check_passes(model):
    r = _kiln("check", model, "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 0 and report["ok"], r.stdout
    for case in report["cases"]:
        assert case["top1_agreement"] == 1.0
        assert len(case["outputs"]) == 61  # logits + 30 layers x (key, value)
        assert max(o["rel"] for o in case["outputs"]) <= 1e-4


def _assert_recognized(model):
    r = _kiln("inspect", model, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    arch = report["architecture"]
    assert (arch["layers"], arch["hidden"], arch["heads"], arch["kv_heads"], arch["head_dim"],
            arch["vocab"]) == (30, 576, 9, 3, 64, 49152)
    assert arch["attention_mask"] == "recognized" and arch["kv_cache"] and arch["causal"]
    assert report["ops_after"]["attention"] == 30
    assert report["ops_per_layer"] <= 15
    return report


def test_kiln_export_checks_and_is_recognized(smollm2_dir):
    _assert_check_passes(smollm2_dir / "model.onnx")
    _assert_recognized(smollm2_dir / "model.onnx")


def test_optimum_export_checks_and_is_recognized(smollm2_optimum):
    report = _assert_recognized(smollm2_optimum)
    assert report["nodes_before"] + report["ops_before"].get("Constant", 0) >= 4700
    _assert_check_passes(smollm2_optimum)


def test_optimum_export_stops_on_generation_configs_eos(smollm2_optimum):
    """optimum's export of the GGUF-loaded model: the tokenizer files call <|im_start|> (1) the
    eos token, generation_config.json says <|im_end|> (2); generate stops on 2, as kiln must."""
    from kiln.compiler.generation_files import read_generation_files

    g = read_generation_files(smollm2_optimum.parent)
    assert (g.stop_token_ids, g.stop_tokens_from) == ([2], "generation_config.json")
    assert g.special_tokens["eos_token_id"] == 1
    assert g.chat_template is not None and "<|im_start|>assistant" in g.chat_template


def test_capital_of_france_through_the_interpreter(smollm2_dir):
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ids = np.array([tok.encode("The capital of France is").ids], np.int64)
    graph = canonicalize(smollm2_dir / "model.onnx").canonical
    feeds = make_feeds(graph, batch=1, seq=ids.shape[1], past=0,
                       rng=np.random.default_rng(0), vocab=49152)
    feeds["input_ids"] = ids
    logits = run(graph, feeds, outputs=["logits"])["logits"][0, -1]
    top5 = [tok.decode([int(i)]) for i in np.argsort(-logits)[:5]]
    assert top5[0] == " Paris", top5
    assert set(top5) >= {" Paris", " the"}


# -- compiled (CPU) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_artifact(smollm2_dir, tmp_path_factory):
    from kiln.compiler.compile import compile_model

    return compile_model(smollm2_dir / "model.onnx", tmp_path_factory.mktemp("art") / "smollm2",
                         max_seq=512)


@pytest.mark.tvm
def test_compiled_smollm2_matches_onnxruntime(smollm2_dir, smollm2_artifact):
    from kiln.runtime.session import Session
    from tests.runtime.test_runtime import ort_greedy, ort_logits

    model = smollm2_dir / "model.onnx"
    session = Session.load(smollm2_artifact)
    rng = np.random.default_rng(7)
    for n in (1, 7, 64, 300):
        ids = rng.integers(0, 49152, (1, n))
        got = session.prefill(ids)
        want = ort_logits(model, ids)["logits"]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err <= 1e-4, f"prompt length {n}: relative error {err:.2e}"
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = tok.encode("The capital of France is").ids
    from kiln.runtime.generate import generate

    got = list(generate(Session.load(smollm2_artifact), prompt, max_new_tokens=32))
    assert got == ort_greedy(model, np.array([prompt]), 32)
    assert tok.decode(got).startswith(" Paris")


@pytest.mark.tvm
def test_kiln_run_streams_paris(smollm2_artifact):
    r = _kiln("run", smollm2_artifact, "--prompt", "The capital of France is",
              "--max-new-tokens", "8", "--greedy", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["text"].startswith(" Paris") and len(out["tokens"]) == 8
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


@pytest.mark.tvm
def test_kiln_run_stops_where_generation_config_says(smollm2_dir, smollm2_artifact):
    """The export's generation_config.json names <|im_end|> (2); a chat answer stops on it by
    itself, --ignore-eos runs to --max-new-tokens, and both are onnxruntime's greedy tokens."""
    from tests.runtime.test_runtime import ort_greedy

    manifest = json.loads((smollm2_artifact / "manifest.json").read_text())
    assert (manifest["stop_token_ids"], manifest["stop_tokens_from"]) == \
        ([2], "generation_config.json")
    r = _kiln("run", smollm2_artifact, "--chat", "--prompt", "What is 2+2?",
              "--max-new-tokens", "40", "--json")
    assert r.exit_code == 0, r.output
    chat = json.loads(r.stdout.strip().splitlines()[-1])
    assert chat["stopped"] == "stop token" and chat["tokens"][-1] == 2
    assert "4" in chat["text"] and len(chat["tokens"]) < 40
    r = _kiln("run", smollm2_artifact, "--chat", "--prompt", "What is 2+2?", "--ignore-eos",
              "--max-new-tokens", "40", "--json")
    free = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(free["tokens"]) == 40 and free["stopped"] == "length"
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    template = (smollm2_artifact / "chat_template.jinja").read_text()
    from kiln.runtime.chat import ChatTemplate

    prompt = tok.encode(ChatTemplate(template).render([{"role": "user",
                                                        "content": "What is 2+2?"}]),
                        add_special_tokens=False).ids
    assert free["prompt_tokens"] == len(prompt)
    want = ort_greedy(smollm2_dir / "model.onnx", np.array([prompt]), 40)
    assert free["tokens"] == want
    assert chat["tokens"] == want[:want.index(2) + 1]
