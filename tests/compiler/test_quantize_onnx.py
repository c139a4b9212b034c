"""`kiln models quantize-onnx`: onnxruntime's MatMulNBits quantization of the fixtures, run by
onnxruntime, and the weight bytes per token counted on ONNX files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from kiln.compiler.cli import main
from kiln.compiler.frontend.onnx_quantize import quantize_onnx
from kiln.compiler.frontend.onnx_traffic import bytes_per_token
from kiln.compiler.frontend.onnxruntime_lm import OrtLM
from tests.helpers import error_lines

DATA = Path(__file__).parent.parent / "data"


def ops(path: Path) -> dict[str, int]:
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    return {op: sum(n.op_type == op for n in nodes) for op in {n.op_type for n in nodes}}


def matmuls(path: Path) -> set[str]:
    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node
            if n.op_type == "MatMul"}


@pytest.mark.parametrize("name", ["llama-optimum", "qwen2-dynamo"])
def test_matmuls_become_matmulnbits_that_onnxruntime_runs(name, tmp_path, rng):
    r = CliRunner().invoke(main, ["models", "quantize-onnx", str(DATA / f"{name}.onnx"), "-o",
                                  str(tmp_path / "q.onnx")])
    assert r.exit_code == 0, r.output
    assert ops(tmp_path / "q.onnx")["MatMulNBits"] == 14 + (name == "llama-optimum")
    ids = rng.integers(0, 256, (1, 12))
    want, got = OrtLM(DATA / f"{name}.onnx")(ids), OrtLM(tmp_path / "q.onnx")(ids)
    assert got.shape == want.shape == (1, 12, 256)
    # int4 with blocks of 32 on random weights: near, not equal (loose, fp32 is the reference)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < rel < 0.5


def test_tied_head_is_left_float_unless_asked(tmp_path):
    model = DATA / "qwen2-optimum.onnx"  # its LM head reads Transpose(embedding table)
    plain = quantize_onnx(model, tmp_path / "plain.onnx")
    assert plain.tied_head and not plain.tied_head_quantized
    assert plain.tied_head in matmuls(plain.path)
    tied = quantize_onnx(model, tmp_path / "tied.onnx", tied_head=True)
    assert tied.tied_head_quantized and tied.quantized == plain.quantized + 1
    assert plain.tied_head not in matmuls(tied.path) and "Gather" in ops(tied.path)
    # fp32 embedding rows + int4 head, instead of the whole fp32 table per token
    assert bytes_per_token(tied.path) < bytes_per_token(plain.path) / 1.5
    ids = np.arange(10)[None]
    assert np.isfinite(OrtLM(tied.path)(ids)).all()


def test_bytes_per_token_counts_one_embedding_row_when_untied():
    model = DATA / "llama-optimum.onnx"  # untied: vocab 256 x hidden 64 fp32 table
    proto = onnx.load(str(model), load_external_data=False)
    total = sum(int(np.prod(t.dims)) * 4 for t in proto.graph.initializer if t.data_type == 1)
    total += sum(int(np.prod(t.dims)) * 8 for t in proto.graph.initializer if t.data_type == 7)
    assert bytes_per_token(model) == total - 256 * 64 * 4 + 64 * 4


def test_bad_input(tmp_path):
    runner = CliRunner()
    for args, message in [([str(tmp_path / "none.onnx")], "no such ONNX file"),
                          ([str(DATA / "llama-optimum.onnx"), "--bits", "3"], "--bits 3"),
                          ([str(DATA / "llama-optimum.onnx"), "--block-size", "24"],
                           "--block-size 24")]:
        r = runner.invoke(main, ["models", "quantize-onnx", *args, "-o", str(tmp_path / "o.onnx")])
        assert r.exit_code == 2 and message in r.stderr, r.output
        assert len(error_lines(r.stderr)) == 1, r.stderr
