"""The `kiln` command line on the fixtures: inspect, check, and one-line errors with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kiln.compiler.cli import main
from tests.helpers import error_lines

DATA = Path(__file__).parent.parent / "data"
FIXTURES = sorted(DATA.glob("*.onnx"))


def kiln(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_fixtures_exist():
    assert {f.stem for f in FIXTURES} >= {f"{fam}-{exp}" for fam in ("llama", "qwen2", "gpt2")
                                           for exp in ("optimum", "dynamo")}


@pytest.mark.parametrize("model", FIXTURES, ids=lambda p: p.stem)
def test_check_passes_on_fixture(model):
    r = kiln("check", model, "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 0, r.stdout
    assert report["ok"] and [c["case"] for c in report["cases"]] == ["prefill", "decode"]
    for case in report["cases"]:
        assert case["top1_agreement"] == 1.0
        assert all(o["rel"] <= 1e-4 for o in case["outputs"])
        assert {o["name"] for o in case["outputs"]} >= {"logits", "present.0.key"}


@pytest.mark.parametrize("model", FIXTURES, ids=lambda p: p.stem)
def test_inspect_recognizes_fixture(model):
    r = kiln("inspect", model, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    arch = report["architecture"]
    family = model.stem.split("-")[0]
    assert arch["layers"] == 2 and arch["hidden"] == 64 and arch["vocab"] == 256
    assert arch["causal"] is True and arch["attention_mask"] == "recognized"
    assert arch["kv_cache"] is True
    assert (arch["heads"], arch["kv_heads"], arch["head_dim"]) == (
        (4, 4, 16) if family == "gpt2" else (4, 2, 16))
    assert arch["norm"]["kind"] == ("layer_norm" if family == "gpt2" else "rms_norm")
    assert (arch["rope"] is None) == (family == "gpt2")
    # at most 15 ops per layer, plus the once-per-model embedding, final norm, head and rope
    assert report["nodes_after"] <= 15 * arch["layers"] + 12
    # nothing of the mask, the head splitting or the shape arithmetic survives
    assert not set(report["generic_ops_left"]) & {"Shape", "Gather", "Range", "Where", "Softmax",
                                                   "Reshape", "IsNaN", "Slice", "Neg"}


def test_inspect_dump_ir(tmp_path):
    r = kiln("inspect", DATA / "llama-optimum.onnx", "--dump-ir", tmp_path / "ir")
    assert r.exit_code == 0
    dumps = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert dumps[0] == "00_input.txt" and any("recognize_attention" in d for d in dumps)
    assert "attention(" in (tmp_path / "ir" / dumps[-1]).read_text()




def _run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.compiler.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_garbage_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "garbage.onnx"
    bad.write_bytes(b"\x00\xffnot a protobuf at all" * 10)
    for cmd in ("inspect", "check"):
        p = _run_cli(cmd, bad)
        assert p.returncode == 2
        lines = error_lines(p.stderr)
        assert len(lines) == 1 and "garbage.onnx" in lines[0], p.stderr
        assert "Traceback" not in p.stderr


def test_truncated_file_exits_2(tmp_path):
    data = (DATA / "llama-optimum.onnx").read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    p = _run_cli("inspect", bad)
    assert p.returncode == 2 and "truncated.onnx" in p.stderr
    assert len(error_lines(p.stderr)) == 1, p.stderr


def test_unsupported_ops_one_line_each(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Col2Im", ["x", "s", "b"], ["y"], name="first_col2im"),
             helper.make_node("Col2Im", ["y", "s", "b"], ["z"], name="second"),
             helper.make_node("STFT", ["z", "s"], ["w"], name="the_stft")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        n, TensorProto.FLOAT, [2]) for n in ("x", "s", "b")],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)])
    path = tmp_path / "unsupported.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    p = _run_cli("inspect", path)
    assert p.returncode == 2
    lines = error_lines(p.stderr)
    assert len(lines) == 2, p.stderr
    assert "Col2Im" in lines[0] and "2 nodes" in lines[0] and "first_col2im" in lines[0]
    assert "STFT" in lines[1] and "the_stft" in lines[1]


def test_missing_external_data_exits_2(tmp_path):
    import onnx

    model = onnx.load(DATA / "llama-optimum.onnx")
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data",
              size_threshold=0)
    (tmp_path / "ext.data").unlink()
    p = _run_cli("check", tmp_path / "ext.onnx")
    assert p.returncode == 2 and "ext.data" in p.stderr
    assert len(error_lines(p.stderr)) == 1, p.stderr


def test_graph_only_synthetic_model_is_recognized(tmp_path):
    """A 1B-shaped graph written without its weights: recognized from shapes alone."""
    r = kiln("models", "synth", "llama-3.2-1b", "-o", tmp_path / "m", "--no-weights")
    assert r.exit_code == 0, r.output
    assert not any(p.suffix == ".data" for p in (tmp_path / "m").iterdir())
    report = json.loads(kiln("inspect", tmp_path / "m" / "model.onnx", "--json").stdout)
    arch = report["architecture"]
    assert (arch["layers"], arch["hidden"], arch["heads"], arch["kv_heads"], arch["vocab"]) == (
        16, 2048, 32, 8, 128256)
    assert report["ops_per_layer"] <= 15
    assert report["parameters"] > 1.2e9
