"""`kiln compile --no-fuse NAME` on the CPU: every fusion off gives the same greedy tokens as
all on, and as onnxruntime; a fusion the target does not take changes nothing it compiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kiln.compiler.cli import main
from kiln.compiler.fusions import FUSIONS
from tests.models.ort_decode import greedy, session

pytestmark = pytest.mark.tvm
MODEL = Path(__file__).parents[1] / "data" / "llama-optimum.onnx"
MAX_SEQ = 64
PROMPT = [5, 77, 3, 191, 42]


def _tokens(art: Path) -> list[int]:
    from kiln.runtime.generate import generate
    from kiln.runtime.session import Session

    return list(generate(Session.load(art), PROMPT, max_new_tokens=16))


@pytest.fixture(scope="module")
def fused_tokens(tmp_path_factory) -> list[int]:
    from kiln.compiler.compile import compile_model

    art = compile_model(MODEL, tmp_path_factory.mktemp("fused") / "art", max_seq=MAX_SEQ)
    assert json.loads((art / "manifest.json").read_text())["fusions"] == ["projections"]
    return _tokens(art)


def test_all_fusions_match_onnxruntime(fused_tokens):
    assert fused_tokens == greedy(session(MODEL), PROMPT, 16)


def test_projections_off_gives_the_same_tokens(fused_tokens, tmp_path):
    """The CLI path, with --dump-ir: no group recorded, the manifest says none ran."""
    r = CliRunner().invoke(main, ["compile", str(MODEL), "-o", str(tmp_path / "art"),
                                  "--max-seq", str(MAX_SEQ), "--no-fuse", "projections",
                                  "--dump-ir", str(tmp_path / "ir"), "-q"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    art = tmp_path / "art"
    assert json.loads((art / "manifest.json").read_text())["fusions"] == []
    last = sorted((tmp_path / "ir").iterdir())[-1].read_text()
    assert "fusion " not in last and " Split(" not in last
    assert _tokens(art) == fused_tokens


@pytest.mark.parametrize("name", [f for f in FUSIONS if f != "projections"] + ["all"])
def test_other_fusions_off_compile_the_same_graph(name):
    """The CPU target takes `projections` only: another --no-fuse leaves its graph (and so
    its kernels and tokens) as with every fusion on; "all" is projections off."""
    from kiln.codegen.targets import host_cpu
    from kiln.compiler.compile import compile_graph
    from kiln.passes.fusion import enabled

    tgt = host_cpu()

    def graph(no_fuse):
        return compile_graph(MODEL, max_seq=MAX_SEQ, progress=lambda m: None,
                             weights_optional=True, pack_block=tgt.pack_block,
                             fusions=enabled(no_fuse, take=tgt.fusions))

    want = graph(["projections"] if name == "all" else [])
    assert graph([name]).dump() == want.dump()


def test_help_lists_the_fusions():
    r = CliRunner().invoke(main, ["compile", "--help"])
    text = " ".join(r.output.split())
    for name in FUSIONS:
        assert f"{name}:" in text, name


def test_an_unknown_fusion_is_refused():
    r = CliRunner().invoke(main, ["compile", str(MODEL), "-o", "x", "--no-fuse", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    np.testing.assert_equal(Path("x").exists(), False)
