"""`kiln package`: the bundle holds no compiler, its launcher runs where only Python and numpy
exist (no site-packages, so neither the installed tvm nor kiln can leak in), weights are optional,
and a CUDA bundle carries the CUDA runtime, libcudart and machine code."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.package import kiln_closure, package
from kiln.runtime import artifact as af

pytestmark = pytest.mark.tvm
pytest.importorskip("tvm")

DATA = Path(__file__).parent.parent / "data"
PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
MB = 1 << 20


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    from kiln.compiler.compile import compile_model

    return compile_model(DATA / "llama-optimum.onnx", tmp_path_factory.mktemp("art") / "llama",
                         max_seq=64)


@pytest.fixture(scope="module")
def bundle(artifact, tmp_path_factory) -> Path:
    return package(artifact, tmp_path_factory.mktemp("bundle") / "llama", python=PYTHON).path


@pytest.fixture(scope="module")
def numpy_only(tmp_path_factory) -> Path:
    """A folder holding numpy alone, the host's only package (with python -S)."""
    site = tmp_path_factory.mktemp("host-site")
    src = Path(next(iter(importlib.util.find_spec("numpy").submodule_search_locations)))
    for name in ("numpy", "numpy.libs"):
        if (src.parent / name).exists():
            (site / name).symlink_to(src.parent / name)
    return site


def launch(bundle: Path, site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
           "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-S", str(bundle / "kiln_run.py"), *args],
                          capture_output=True, text=True, env=env, timeout=300)


def test_bundle_has_no_compiler_and_is_small(bundle):
    files = [p for p in bundle.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert "libtvm_compiler.so" not in names
    assert not (bundle / "lib" / "tvm" / "relax").exists()
    assert not (bundle / "lib" / "tvm" / "3rdparty").exists()
    assert not [p for p in files if p.suffix == ".pyc"]
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["python"] == PYTHON and info["params"] is True
    without_params = sum(v for k, v in info["sizes"].items() if k != "parameters")
    assert without_params < 30 * MB, info["sizes"]


def test_bundled_kiln_is_the_runtime_only(bundle):
    modules = set(kiln_closure())
    assert "kiln.compiler.errors" in modules and "kiln.runtime.session" in modules
    assert not [m for m in modules if m.startswith(("kiln.codegen", "kiln.passes"))
                or (m.startswith("kiln.compiler.") and m != "kiln.compiler.errors")]
    shipped = {p.relative_to(bundle / "lib").as_posix() for p in (bundle / "lib" /
                                                                  "kiln").rglob("*.py")}
    assert "kiln/compiler/errors.py" in shipped and "kiln/runtime/bundle/bench.py" in shipped
    assert not [p for p in shipped if "compile.py" in p or "kiln_run" in p]


def test_launcher_imports_from_the_bundle_only(bundle, numpy_only):
    p = launch(bundle, numpy_only, "info")
    assert p.returncode == 0, p.stderr[-2000:]
    info = json.loads(p.stdout)
    for key in ("tvm", "kiln", "tvm_ffi"):
        assert info[key].startswith(str(bundle)), (key, info[key])
    assert info["compiler_loaded"] is False
    assert (bundle / "site" / ".complete").is_file()


def test_launcher_generates_as_the_runtime_does(artifact, bundle, numpy_only):
    from kiln.runtime.generate import generate
    from kiln.runtime.session import Session

    want = list(generate(Session.load(artifact), [1, 2, 3], max_new_tokens=6))
    p = launch(bundle, numpy_only, "run", "--prompt-ids", "1,2,3", "--max-new-tokens", "6",
               "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads(p.stdout)["tokens"] == want


def test_launcher_bench_reports_both_phases(bundle, numpy_only, tmp_path):
    out = tmp_path / "bench.json"
    p = launch(bundle, numpy_only, "bench", "--prompt-lens", "8", "--decode-len", "4",
               "--repeat", "1", "--json", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["phase"], r["tokens"]) for r in rows] == [("prefill", 8), ("decode", 4)]
    assert all(r["tok_s"] > 0 for r in rows)


def test_bundle_without_weights_runs_on_synthetic_ones(artifact, numpy_only, tmp_path):
    b = package(artifact, tmp_path / "light", python=PYTHON, params=False).path
    assert not (b / "artifact" / af.PARAMS).exists()
    assert af.open_artifact(b / "artifact").has_params is False
    p = launch(b, numpy_only, "run", "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert p.returncode == 2 and "--synthetic-weights" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = launch(b, numpy_only, "run", "--prompt-ids", "1,2", "--max-new-tokens", "2",
               "--synthetic-weights", "7", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads(p.stdout)["tokens"]) == 2


def test_other_python_is_refused(bundle, numpy_only, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy, ignore=shutil.ignore_patterns("site"))
    info = json.loads((copy / "bundle.json").read_text())
    (copy / "bundle.json").write_text(json.dumps({**info, "python": "3.99"}))
    p = launch(copy, numpy_only, "info")
    assert p.returncode == 2 and "made for Python 3.99" in p.stderr


@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_cuda_bundle_carries_the_cuda_runtime(tmp_path):
    from kiln.codegen import cuda_toolchain as ct
    from tests.codegen.test_cuda_toolchain import matmul_relu, sm90

    with af.ArtifactWriter(tmp_path / "mm") as w:
        ct.compile_for_cuda(matmul_relu(), sm90()).export_library(str(w.path(af.KERNELS)))
        w.add(af.KERNELS)
        art = w.commit({"target": {"name": "cuda", "kind": "cuda", "arch": "sm_90"},
                        "params": [], "kv_cache": {"capacity": 0}})
    b = package(art, tmp_path / "bundle", python=PYTHON).path
    lib = b / "lib" / "tvm" / "lib"
    assert {"libtvm_runtime.so", "libtvm_runtime_cuda.so", "libcudart.so.13"} <= {
        p.name for p in lib.iterdir()}
    ct.require_fatbin(b / "artifact" / af.KERNELS, "sm_90")
    assert np.isclose(sum(json.loads((b / "bundle.json").read_text())["sizes"].values()),
                      sum(p.stat().st_size for p in b.rglob("*") if p.is_file()),
                      rtol=0.01)
