"""`kiln eval` and multi-engine `kiln bench` on one compiled tiny fixture: perplexity against a
hand computation from onnxruntime's logits, KL against itself and its ONNX, the CLI's JSON, and
one-line errors with exit 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.special import log_softmax

from kiln.compiler.cli import main
from kiln.compiler.frontend.onnxruntime_lm import OrtLM
from tests.helpers import assert_close, error_lines

pytestmark = pytest.mark.tvm

DATA = Path(__file__).parent.parent / "data"
MODEL = DATA / "llama-optimum.onnx"  # vocab 256, untied LM head
CONTEXT = 64
TEXT = "Call me Ishmael. Some years ago, never mind how long precisely, I thought I would sail."


def kiln(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def byte_tokenizer(path: Path) -> None:
    """A byte-level tokenizer of 256 tokens and no merges: fits the fixtures' vocab of 256."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.save(str(path))


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from kiln.compiler.compile import compile_model

    src = tmp_path_factory.mktemp("model")
    shutil.copy(MODEL, src / MODEL.name)
    byte_tokenizer(src / "tokenizer.json")  # the compile copies it into the artifact
    return compile_model(src / MODEL.name, tmp_path_factory.mktemp("art") / "llama",
                         max_seq=CONTEXT)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT * 2)
    return path


def test_perplexity_is_the_hand_computation_from_onnxruntime(artifact, text):
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(str(artifact / "tokenizer.json")).encode(TEXT[:60]).ids)
    assert len(ids) == 60
    logp = log_softmax(OrtLM(MODEL)(ids[None])[0, :-1].astype(np.float64), axis=-1)
    expected = math.exp(-logp[np.arange(59), ids[1:]].mean())
    text.with_name("short.txt").write_text(TEXT[:60])
    r = kiln("eval", artifact, "--text", text.with_name("short.txt"), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["tokens"] == 59
    assert_close(got["perplexity"], expected, rtol=1e-4, name="perplexity")


def test_kl_against_itself_and_its_onnx(artifact, text):
    r = kiln("eval", artifact, "--text", text, "--reference", artifact, "--json", "--stride", "16")
    assert r.exit_code == 0, r.output
    same = json.loads(r.stdout)
    assert set(same) >= {"perplexity", "reference_perplexity", "kl_divergence", "top1_agreement",
                         "tokens"}
    assert same["tokens"] == len(TEXT) * 2 - 1  # one window per 16 new tokens, all scored once
    assert same["kl_divergence"] == 0.0 and same["top1_agreement"] == 1.0
    assert same["perplexity"] == same["reference_perplexity"]
    r = kiln("eval", artifact, "--text", text, "--reference", MODEL, "--json", "--max-tokens", 100)
    assert r.exit_code == 0, r.output
    vs_onnx = json.loads(r.stdout)
    assert vs_onnx["tokens"] == 99 and vs_onnx["context"] == CONTEXT
    assert abs(vs_onnx["kl_divergence"]) < 1e-8 and vs_onnx["top1_agreement"] == 1.0
    assert vs_onnx["reference_perplexity"] == pytest.approx(vs_onnx["perplexity"], rel=1e-5)


def test_default_text_is_shipped(artifact):
    from kiln.compiler.evaluation import default_text

    assert default_text().is_file() and (default_text().parent / "EVAL_TEXT.md").is_file()
    r = kiln("eval", artifact, "--json", "--max-tokens", 40)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["tokens"] == 39


def other_vocab_onnx(path: Path, vocab: int = 300) -> Path:
    """logits = float(input_ids)[..., None] @ ones[1, vocab]: a decoder-shaped ONNX of another
    vocabulary."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["f", "axis"], ["f3"]),
         helper.make_node("MatMul", ["f3", "w"], ["logits"])],
        "other_vocab",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        [numpy_helper.from_array(np.array([-1], np.int64), "axis"),
         numpy_helper.from_array(np.ones((1, vocab), np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9  # what the installed onnxruntime reads
    onnx.save(model, str(path))
    return path


def test_bad_input_is_one_line_and_exit_2(artifact, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    cases = [(("--text", tmp_path / "missing.txt"), "no such text file"),
             (("--text", empty), "the text is empty"),
             (("--reference", other_vocab_onnx(tmp_path / "v300.onnx")), "vocabulary of 300"),
             (("--reference", tmp_path / "nothing"), "must be an artifact directory"),
             (("--stride", 0), "--stride 0")]
    for args, message in cases:
        r = kiln("eval", artifact, *args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.stderr and len(error_lines(r.stderr)) == 1, r.stderr


def test_bench_several_engines(artifact, tmp_path):
    from kiln.compiler.frontend.onnx_quantize import quantize_onnx

    int4 = quantize_onnx(MODEL, tmp_path / "int4.onnx").path
    out = tmp_path / "bench.json"
    r = kiln("bench", artifact, artifact, "--label", "fp32", "--label", "again",
             "--vs-onnx", MODEL, "--vs-onnx", int4, "--repeat", 1, "--prompt-lens", 8,
             "--decode-len", 2, "--threads", 1, "--json", out, "--plot", tmp_path / "b.png")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    labels = [e["label"] for e in report["engines"]]
    assert labels == ["fp32", "again", "onnxruntime:llama-optimum", "onnxruntime:int4"]
    assert report["baseline"] == "fp32" and (tmp_path / "b.png").stat().st_size > 0
    fp32, again, ort, ort4 = report["engines"]
    # untied head: the embedding table counts one row of 64 floats, every other weight whole
    assert fp32["weight_bytes_per_token"] == again["weight_bytes_per_token"] == report[
        "weight_bytes"] < ort["weight_bytes_per_token"] + 1024
    assert ort4["weight_bytes_per_token"] < ort["weight_bytes_per_token"] / 3
    for e in report["engines"]:
        assert e["decode_tok_s"] > 0 and set(e["prefill_tok_s"]) == {"8"}
        assert e["roofline_tok_s"] == pytest.approx(
            report["bandwidth_gb_s"] * 1e9 / e["weight_bytes_per_token"])
        assert set(e["vs_baseline"]) >= {"prefill@8", "decode@2"}
    assert fp32["vs_baseline"]["decode@2"] == 1.0
    assert {(r["engine"], r["phase"]) for r in report["rows"]} >= {
        ("fp32", "prefill_last"), ("again", "prefill_last"), ("onnxruntime:int4", "decode")}
    assert set(report["ratios"]) == {"prefill@8", "prefill_last@8", "decode@2"}


def test_bench_single_artifact_keeps_its_keys(artifact, tmp_path):
    out = tmp_path / "bench.json"
    r = kiln("bench", artifact, "--vs-onnx", MODEL, "--repeat", 1, "--prompt-lens", 8,
             "--decode-len", 2, "--threads", 1, "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert set(report) >= {"threads", "bandwidth_gb_s", "weight_bytes", "roofline_tok_s", "rows",
                           "ratios", "decode_fraction_of_roofline"}
    assert {r["engine"] for r in report["rows"]} == {"kiln", "onnxruntime"}
    assert report["ratios"]["decode@2"] > 0
