"""`kiln_run.py convert` on the host of a bundle (numpy only): an artifact compiled --no-weights
gets the parameters `kiln convert` would write on the build machine, bit for bit, from the
model's external data file, and then decodes the same tokens; GPTQ and bad weights files are
refused with one line and exit code 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.compiler.errors import KilnError
from kiln.compiler.package import package
from kiln.runtime import artifact as af
from kiln.runtime.convert import convert_artifact
from kiln.runtime.params import read_safetensors
from tests.runtime.test_package import PYTHON, launch, numpy_only

pytestmark = pytest.mark.tvm
pytest.importorskip("tvm")
assert numpy_only  # a fixture, used by name

PRESETS = {"fp32": None, "w4g32-rtn": "w4g32-rtn"}
PROMPT = [1, 2, 3]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """llama-tiny as ONNX with its weights in model.onnx.data."""
    from kiln.models.synthetic import write_synthetic

    return write_synthetic("llama-tiny", tmp_path_factory.mktemp("model"), weights=True)


@pytest.fixture(scope="module")
def kernels(model, tmp_path_factory) -> dict[str, Path]:
    """The model compiled --no-weights for this CPU, per preset (what a bundle ships)."""
    from kiln.compiler.compile import compile_model

    out = tmp_path_factory.mktemp("kernels")
    return {name: compile_model(model, out / name, max_seq=64, weights=False, quant=q)
            for name, q in PRESETS.items()}


@pytest.fixture(scope="module")
def reference(model, kernels, tmp_path_factory) -> dict[str, Path]:
    """The same artifacts with the parameters `kiln convert` writes on the build machine."""
    from kiln.compiler.compile import convert

    out = tmp_path_factory.mktemp("reference")
    for name, art in kernels.items():
        shutil.copytree(art, out / name)
        convert(model, out / name)
    return {name: out / name for name in kernels}


@pytest.fixture(scope="module")
def bundle(kernels, tmp_path_factory) -> Path:
    return package(kernels["fp32"], tmp_path_factory.mktemp("bundle") / "b", python=PYTHON).path


def copy(art: Path, dst: Path, edit=None) -> Path:
    """A copy of the artifact, its manifest edited by `edit(manifest)`."""
    shutil.copytree(art, dst)
    if edit is not None:
        m = json.loads((dst / af.MANIFEST).read_text())
        edit(m)
        (dst / af.MANIFEST).write_text(json.dumps(m))
    return dst


def assert_same_params(got: Path, want: Path) -> None:
    a, b = read_safetensors(got / af.PARAMS), read_safetensors(want / af.PARAMS)
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def greedy(art: Path, n: int = 6) -> list[int]:
    from kiln.runtime.generate import generate
    from kiln.runtime.session import Session

    return list(generate(Session.load(art), PROMPT, max_new_tokens=n))


def test_bundle_converts_its_artifact_then_runs_it(model, reference, bundle, numpy_only):
    art = bundle / "artifact"
    p = launch(bundle, numpy_only, "convert", "--weights", str(model.with_suffix(".onnx.data")))
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(art)
    assert "converting 15 parameters" in p.stderr and "parameters written" in p.stderr
    assert_same_params(art, reference["fp32"])
    assert af.open_artifact(art).has_params  # checksums verified
    assert json.loads((bundle / "bundle.json").read_text())["params"] is True
    p = launch(bundle, numpy_only, "run", "--prompt-ids", ",".join(map(str, PROMPT)),
               "--max-new-tokens", "6", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["tokens"] == greedy(reference["fp32"])


def test_rtn_quantized_copy_matches_kiln_convert(model, kernels, reference, bundle, numpy_only,
                                                 tmp_path):
    src, out = kernels["w4g32-rtn"], tmp_path / "converted"
    p = launch(bundle, numpy_only, "convert", "--weights", str(model.parent), "--artifact",
               str(src), "--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    assert af.open_artifact(src).has_params is False  # the original is left as it was
    assert_same_params(out, reference["w4g32-rtn"])
    assert greedy(out) == greedy(reference["w4g32-rtn"])


def _gptq_no_weights(m: dict) -> None:
    """What `--quant w4g32 --no-weights` records for a model with a tokenizer: GPTQ preset,
    weights described as rounded to nearest (`kiln convert` calibrates them)."""
    m["quant"]["method"] = "gptq"
    m["files"][af.TOKENIZER] = af.sha256(Path(__file__))


def _gptq_derived(m: dict) -> None:
    """What a GPTQ compile records (then packaged --no-params): fn gptq over a Hessian."""
    for p in m["params"]:
        d = p["derivation"]
        if d.get("fn") == "quant_blocked" and d["sources"][0].get("fn") == "quantize":
            q = d["sources"][0]
            q["fn"], q["sources"] = "gptq", [*q["sources"], {"kind": "inline"}]
            return


def test_gptq_is_refused_in_one_line(model, kernels, bundle, numpy_only, tmp_path):
    src = kernels["w4g32-rtn"]
    art = copy(src, tmp_path / "a", _gptq_no_weights)
    shutil.copyfile(Path(__file__), art / af.TOKENIZER)
    p = launch(bundle, numpy_only, "convert", "--weights", str(model.parent), "--artifact",
               str(art))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "GPTQ" in p.stderr and "kiln convert" in p.stderr and "build machine" in p.stderr
    assert "parameter /MatMul" in p.stderr
    with pytest.raises(KilnError, match=r"^parameter \S+: GPTQ-quantized.*kiln convert"):
        convert_artifact(copy(src, tmp_path / "b", _gptq_derived), model.parent)
    assert not (art / af.PARAMS).exists()


def test_gptq_preset_without_tokenizer_is_rounded_as_kiln_convert_does(model, kernels,
                                                                       tmp_path):
    """Without a tokenizer `kiln convert` cannot calibrate and rounds to nearest: so does the
    host."""
    from kiln.compiler.compile import convert

    def gptq(m: dict) -> None:
        m["quant"]["method"] = "gptq"

    host = copy(kernels["w4g32-rtn"], tmp_path / "host", gptq)
    build = copy(kernels["w4g32-rtn"], tmp_path / "build", gptq)
    convert_artifact(host, model.parent)
    convert(model, build)
    assert_same_params(host, build)


def test_bad_weights_files_are_one_line_errors(model, kernels, bundle, numpy_only, tmp_path):
    data = model.with_suffix(".onnx.data")
    cut = tmp_path / "cut" / data.name
    cut.parent.mkdir()
    cut.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    for weights, words in [(cut, [str(cut), "bytes", "truncated"]),
                           (tmp_path / "empty", [str(tmp_path / "empty"), "no such"]),
                           (cut.parent.parent, [data.name, "missing"])]:
        p = launch(bundle, numpy_only, "convert", "--weights", str(weights), "--artifact",
                   str(kernels["fp32"]))
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert all(w in p.stderr for w in words), p.stderr
    assert not af.open_artifact(kernels["fp32"]).has_params


def _wrong_shape(m: dict) -> None:
    p = next(p for p in m["params"] if p["file"] == af.PARAMS)
    p["shape"] = [*p["shape"][:-1], p["shape"][-1] + 1]


def _old_kiln(m: dict) -> None:
    for p in m["params"]:
        if p["derivation"]["kind"] == "external":
            del p["derivation"]["dtype"], p["derivation"]["shape"]


@pytest.mark.parametrize("edit,message", [(_wrong_shape, r"the artifact expects"),
                                          (_old_kiln, r"recompile with this kiln")])
def test_mismatched_manifests_are_refused(model, kernels, tmp_path, edit, message):
    art = copy(kernels["fp32"], tmp_path / "a", edit)
    with pytest.raises(KilnError, match=rf"^parameter \S+: .*{message}") as e:
        convert_artifact(art, model.parent)
    assert "\n" not in str(e.value)
    assert not (art / af.PARAMS).exists() and not list(art.glob("*.partial"))


def test_shipped_converter_has_no_compiler_imports():
    import ast

    import kiln.runtime.convert as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("kiln.compiler")} == {"kiln.compiler.errors"}
    assert {m.split(".")[0] for m in imported if m} <= {"__future__", "json", "os", "time",
                                                         "collections", "pathlib", "numpy",
                                                         "kiln"}
