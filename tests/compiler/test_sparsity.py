"""`kiln compile --sparsity` end to end on fixtures: a pruned artifact's greedy tokens equal the
interpreter's on the same pruned graph, `kiln convert` and the GPU host's converter rebuild its
parameters bit for bit, `kiln inspect` finds a pre-pruned export's zeros and 2:4 pattern, and bad
options get one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kiln.compiler.cli import main
from kiln.runtime import artifact as af
from kiln.runtime.params import read_safetensors
from kiln.runtime.pruning import prune_magnitude
from tests.compiler.test_eval_and_bench import byte_tokenizer
from tests.helpers import error_lines

DATA = Path(__file__).parent.parent / "data"
MODEL = DATA / "llama-optimum.onnx"
MAX_SEQ = 64


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The llama fixture with a byte-level tokenizer beside it (the calibration text's)."""
    src = tmp_path_factory.mktemp("model")
    shutil.copy(MODEL, src / MODEL.name)
    byte_tokenizer(src / af.TOKENIZER)
    return src / MODEL.name


@pytest.fixture(scope="module")
def sparse_w8(model, tmp_path_factory) -> Path:
    """SparseGPT 2:4 with w8 GPTQ, mask and codes chosen in one sweep."""
    from kiln.compiler.compile import compile_model

    return compile_model(model, tmp_path_factory.mktemp("art") / "sparse", max_seq=MAX_SEQ,
                         sparsity="2:4", quant="w8")


def interpreter_greedy(graph, prompt: list[int], n: int) -> list[int]:
    from kiln.compiler.interpreter import run
    from kiln.passes.gptq import _feeds

    ids = list(prompt)
    for _ in range(n):
        logits = run(graph, _feeds(graph, np.array([ids])), outputs=["logits"])["logits"]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.tvm
def test_sparse_artifact_greedy_tokens_equal_the_interpreters(model, sparse_w8, rng):
    from kiln.compiler.compile import compile_graph
    from kiln.passes.prune_weights import parse_config
    from kiln.passes.quantize import parse_preset
    from kiln.runtime.generate import generate
    from kiln.runtime.session import Session

    manifest = json.loads((sparse_w8 / af.MANIFEST).read_text())
    assert manifest["sparsity"]["sparsity"] == "2:4"
    assert manifest["sparsity"]["method"] == "sparsegpt"
    graph = compile_graph(model, max_seq=MAX_SEQ, progress=lambda m: None,
                          weights_optional=False, quant=parse_preset("w8"),
                          prune=parse_config("2:4"))
    prompt = [int(t) for t in rng.integers(0, 256, 6)]
    got = list(generate(Session.load(sparse_w8), prompt, max_new_tokens=10))
    assert got == interpreter_greedy(graph, prompt, 10)


@pytest.mark.tvm
def test_convert_rebuilds_a_pruned_artifacts_params_bit_for_bit(model, sparse_w8, tmp_path):
    from safetensors.numpy import save_file

    from kiln.compiler.compile import convert

    again = shutil.copytree(sparse_w8, tmp_path / "again")
    want = read_safetensors(sparse_w8 / af.PARAMS)
    save_file({k: np.zeros_like(v) for k, v in want.items()}, str(again / af.PARAMS))
    convert(model, again)
    got = read_safetensors(again / af.PARAMS)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


@pytest.mark.tvm
def test_magnitude_no_weights_converts_on_the_gpu_host_as_kiln_convert_does(tmp_path):
    from kiln.compiler.compile import compile_model, convert
    from kiln.models.synthetic import write_synthetic
    from kiln.runtime.convert import convert_artifact

    onnx = write_synthetic("llama-tiny", tmp_path / "model", weights=True)
    bare = compile_model(onnx, tmp_path / "bare", max_seq=MAX_SEQ, weights=False,
                         sparsity="0.5", prune_method="magnitude")
    reference = shutil.copytree(bare, tmp_path / "reference")
    convert(onnx, reference)
    host = convert_artifact(bare, onnx.with_name("model.onnx.data"), out=tmp_path / "host")
    want, got = read_safetensors(reference / af.PARAMS), read_safetensors(host / af.PARAMS)
    assert sorted(got) == sorted(want)
    derivations = json.dumps(json.loads((bare / af.MANIFEST).read_text())["params"])
    assert '"fn": "prune_magnitude"' in derivations  # replayed by the host's converter
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name


def pre_pruned(tmp: Path) -> Path:
    """The llama fixture with every linear weight but the LM head's pruned 2:4 along its input
    dimension, as a pruned checkpoint exports it."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(MODEL))
    readers = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    head = next(n.input[1] for n in m.graph.node
                if n.op_type == "MatMul" and n.output[0] == m.graph.output[0].name)
    for init in m.graph.initializer:
        if init.name in readers and init.name != head and len(init.dims) == 2:
            w = numpy_helper.to_array(init)  # [K, N]: y = x @ w
            init.CopyFrom(numpy_helper.from_array(
                np.ascontiguousarray(prune_magnitude(w.T, fraction=0.5, n=2, m=4).T), init.name))
    path = tmp / "pruned.onnx"
    onnx.save(m, str(path))
    return path


def test_inspect_reports_a_pre_pruned_exports_sparsity(tmp_path):
    r = CliRunner().invoke(main, ["inspect", str(pre_pruned(tmp_path)), "--json", "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    layers = json.loads(r.output)["weight_sparsity"]
    sparse = [w for w in layers if w["zeros"] > 0]
    assert len(sparse) == len(layers) - 1  # the LM head stays dense
    assert all(w["zeros"] == 0.5 and w["pattern"] == "2:4" for w in sparse), sparse
    text = CliRunner().invoke(main, ["inspect", str(pre_pruned(tmp_path)), "-q"]).output
    assert "weight sparsity" in text and "2:4" in text


def run_cli(*args):
    """In process (a subprocess pays seconds of imports per case); stderr kept apart."""
    return CliRunner().invoke(main, [*map(str, args), "-q"])


@pytest.mark.parametrize(("args", "message"), [
    (("--sparsity", "1.5"), "--sparsity 1.5: the fraction of weights pruned must be between"),
    (("--sparsity", "3:2"), "--sparsity 3:2: N:M keeps N of every M columns"),
    (("--sparsity", "0.5", "--prune-method", "wanda", "--no-weights"),
     "--prune-method wanda with --no-weights"),
    (("--prune-method", "magnitude"), "--prune-method needs --sparsity"),
])
def test_bad_sparsity_options_exit_2_with_one_line(model, tmp_path, args, message):
    p = run_cli("compile", model, "-o", tmp_path / "out", *args)
    lines = error_lines(p.stderr)
    assert p.exit_code == 2 and len(lines) == 1 and message in lines[0], p.stderr


def test_calibrated_pruning_without_a_tokenizer_exits_2(tmp_path):
    shutil.copy(MODEL, tmp_path / MODEL.name)
    p = run_cli("compile", tmp_path / MODEL.name, "-o", tmp_path / "out", "--sparsity", "2:4")
    lines = error_lines(p.stderr)
    assert p.exit_code == 2 and len(lines) == 1, p.stderr
    assert "--prune-method sparsegpt needs calibration text" in lines[0]
    assert "no tokenizer.json beside" in lines[0]


def test_the_cpu_vector_width_picks_the_sparse_kernels_or_none(tmp_path, monkeypatch):
    """The bitmap kernels expand with AVX-512's vexpand or AVX2's permutes, each deciding with
    its own measured rates: a 60%-pruned export compiles to sparse_linear for a 512-bit CPU; on
    a 256-bit one the permutes cost more than the bytes save (dense), unless its GEMVs were
    memory-bound; a CPU without AVX2 has no sparse kernels at all."""
    import kiln.passes.sparsify as sparsify_pass
    from kiln.codegen.targets import cpu
    from kiln.compiler.compile import compile_graph
    from tests.passes.test_sparsify import MEMORY_BOUND
    from tests.runtime.test_sparse_artifacts import pre_pruned

    model = pre_pruned(tmp_path)

    def ops(vector_bits: int) -> set[str]:
        tgt = cpu("x86-64", vector_bits=vector_bits)
        graph = compile_graph(model, max_seq=MAX_SEQ, weights_optional=False, progress=print,
                              sparse_target=tgt.sparse_target())
        return {n.op for n in graph.nodes}

    assert "sparse_linear" not in ops(128)
    assert "sparse_linear" not in ops(256)
    assert "sparse_linear" in ops(512)
    monkeypatch.setitem(sparsify_pass.SPARSE_TARGETS, "cpu-avx2", MEMORY_BOUND)
    assert "sparse_linear" in ops(256)
