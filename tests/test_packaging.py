"""The wheel holds every module of the source tree, and `import kiln` stays light."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: kiln import path -> folder, as setup.py maps them
FOLDERS = {"kiln": "api", **{f"kiln.{r}": r for r in
                             ("compiler", "passes", "codegen", "runtime", "models")}}
DATA = ["kiln/models/data/eval.txt", "kiln/models/data/calibration.txt",
        "kiln/models/data/calibration_mixed.txt", "kiln/models/data/EVAL_TEXT.md"]


def _source_modules() -> set[str]:
    """Every .py file of the mapped folders, as the path it must have inside the wheel."""
    found = set()
    for name, folder in FOLDERS.items():
        base = ROOT / folder
        files = base.glob("*.py") if name == "kiln" else base.rglob("*.py")
        for f in files:
            if "__pycache__" not in f.parts:
                found.add("/".join([*name.split("."), *f.relative_to(base).parts]))
    return found


def test_wheel_holds_every_source_module(tmp_path: Path) -> None:
    # built from a copy so that the build's scratch folders never land in the working tree
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / f, src / f)
    for folder in FOLDERS.values():
        shutil.copytree(ROOT / folder, src / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    [wheel] = (tmp_path / "dist").glob("kiln-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n for n in names if n.endswith(".py")}
    expected = _source_modules()
    assert "kiln/codegen/cuda/backend.py" in expected  # the subpackage a hand list once missed
    assert in_wheel - expected == set(), "modules in the wheel but not in the source tree"
    assert expected - in_wheel == set(), "source modules the wheel lacks (an __init__.py missing?)"
    assert set(DATA) <= names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kiln = kiln.compiler.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_every_top_level_package_is_mapped() -> None:
    """A new top-level folder holding a package must be added to setup.py's ROOTS."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests"} == set(FOLDERS.values())


def test_import_kiln_runtime_is_light() -> None:
    """kiln's top-level names load lazily: the runtime (a bundle on a host with TVM's runtime
    alone) must not drag in the compiler, onnx or TVM."""
    code = ("import sys, kiln, kiln.runtime.session, kiln.runtime.generate\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('onnx', 'onnxruntime', 'tvm')"
            " or m.startswith(('kiln.compiler.compile', 'kiln.codegen', 'kiln.passes'))]\n"
            "print(heavy)\n"
            "import kiln.compiler.compile as c\n"
            "assert kiln.compile is c.compile_model and kiln.Session is kiln.runtime.session."
            "Session\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]"
