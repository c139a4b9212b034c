"""`kiln package`: an artifact plus all a host with only Python and numpy needs to run it.

    BUNDLE/kiln_run.py     launcher: `python BUNDLE/kiln_run.py run|bench|info`
    BUNDLE/bundle.json     format, versions, the Python it is for, the parts' sizes
    BUNDLE/artifact/       the artifact (parameters optional: real weights may be too big to move)
    BUNDLE/lib/tvm/        apache-tvm without its compiler (libtvm_compiler.so, the compiler's
                           Python packages, sources, headers, caches); libcudart for CUDA
    BUNDLE/lib/kiln/       kiln's runtime and the kiln modules it imports, nothing else
    BUNDLE/lib/typing_extensions.py   tvm-ffi's one pure-Python dependency
    BUNDLE/wheels/         the apache-tvm-ffi wheel for the host's Python (the launcher unzips it)
A tuning bundle (`kiln tune --bundle`) holds tuning/ (kiln.codegen.tune's plan and candidate
kernels) in place of artifact/; `python BUNDLE/kiln_run.py tune -o TUNING.json` measures it.

This module never imports tvm: it finds the installed package with importlib.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af

FORMAT = "kiln-bundle"
FORMAT_VERSION = 1
FFI_DIST, FFI_VERSION = "apache-tvm-ffi", "0.1.14.post0"
WHEELS = Path.home() / ".cache" / "kiln" / "wheels"
#: parts of the tvm package the runtime never loads (seen: `import tvm, tvm.runtime.vm` with
#: TVM_USE_RUNTIME_LIB=1 imports none of these packages and loads libtvm_runtime.so alone)
TVM_DROP = ("lib/libtvm_compiler.so", "lib/libtvm_runtime_extra.so", "lib64", "3rdparty",
            "include", "src", "cmake", "relax", "s_tir", "topi", "web", "testing")
#: where the import closure of the bundled kiln code starts
KILN_ROOTS = ("kiln.runtime", "kiln.runtime.bundle")
LAUNCHER = "kiln_run.py"
#: a tuning bundle's folder of candidate kernels and their plan (kiln.codegen.tune)
TUNING = "tuning"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Bundle:
    path: Path
    sizes: dict[str, int]  # part -> bytes on disk

    @property
    def total(self) -> int:
        return sum(self.sizes.values())


def package(artifact_dir: str | Path, bundle_dir: str | Path, *, python: str = "3.12",
            params: bool = True, ffi_wheel: Path | None = None,
            progress: Progress = lambda msg: None) -> Bundle:
    """Write the bundle for `artifact_dir` into `bundle_dir` (atomically: staged, renamed)."""
    art = af.open_artifact(artifact_dir)
    out = Path(bundle_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        cuda = art.manifest["target"].get("kind") == "cuda"
        progress("copying the artifact")
        _copy_artifact(art, stage / "artifact", params=params)
        wheel = _copy_runtime(stage, cuda=cuda, python=python, ffi_wheel=ffi_wheel,
                              progress=progress)
        sizes = part_sizes(stage)
        _write_info(stage, art, python=python, wheel=wheel.name, params=params, sizes=sizes)
        _replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Bundle(out, sizes)


def package_tuning(plan_dir: Path, bundle_dir: str | Path, *, cuda: bool, python: str = "3.12",
                   ffi_wheel: Path | None = None,
                   progress: Progress = lambda msg: None) -> Path:
    """A tuning bundle: the plan and candidate kernels of `kiln tune --bundle` (tuning/) and
    the runtime to measure them (`python BUNDLE/kiln_run.py tune -o TUNING.json`)."""
    from importlib.metadata import version

    out = Path(bundle_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        shutil.copytree(plan_dir, stage / TUNING)
        wheel = _copy_runtime(stage, cuda=cuda, python=python, ffi_wheel=ffi_wheel,
                              progress=progress)
        info = {"format": FORMAT, "format_version": FORMAT_VERSION, "python": python,
                "ffi_wheel": wheel.name, "tvm_version": version("apache-tvm"),
                "tuning": TUNING, "params": False, "sizes": part_sizes(stage)}
        (stage / "bundle.json").write_text(json.dumps(info, indent=2))
        _replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _copy_runtime(stage: Path, *, cuda: bool, python: str, ffi_wheel: Path | None,
                  progress: Progress) -> Path:
    """The TVM runtime, kiln's runtime, the tvm-ffi wheel and the launcher; returns the wheel."""
    progress("copying the TVM runtime")
    _copy_tvm(stage / "lib" / "tvm", cuda=cuda)
    shutil.copyfile(_module_file("typing_extensions"), stage / "lib" / "typing_extensions.py")
    _copy_kiln(stage / "lib")
    progress(f"finding the {FFI_DIST} wheel for Python {python}")
    wheel = ffi_wheel or find_ffi_wheel(python)
    (stage / "wheels").mkdir()
    shutil.copyfile(wheel, stage / "wheels" / wheel.name)
    shutil.copyfile(_launcher(), stage / LAUNCHER)
    return wheel


def part_sizes(bundle: Path) -> dict[str, int]:
    """Bytes per part: artifact kernels, parameters, tvm runtime, tvm-ffi wheel, kiln, other."""
    parts = {"kernels and constants": 0, "parameters": 0, "tvm runtime": 0, "tvm-ffi wheel": 0,
             "kiln runtime": 0, "other": 0}
    for f in (p for p in bundle.rglob("*") if p.is_file()):
        rel = f.relative_to(bundle).as_posix()
        part = ("parameters" if rel == f"artifact/{af.PARAMS}" else
                "kernels and constants" if rel.startswith("artifact/") else
                "tvm runtime" if rel.startswith("lib/tvm/") else
                "tvm-ffi wheel" if rel.startswith("wheels/") else
                "kiln runtime" if rel.startswith("lib/kiln/") else "other")
        parts[part] += f.stat().st_size
    return parts


# -- the parts ----------------------------------------------------------------------------------

def _copy_artifact(art: af.Artifact, dst: Path, *, params: bool) -> None:
    """Copy the artifact's files; without `params`, drop the weights from the manifest too, so
    the copy reads as compiled --no-weights (run it with --synthetic-weights)."""
    dst.mkdir(parents=True)
    files = dict(art.manifest["files"])
    if not params:
        files.pop(af.PARAMS, None)
    for name in files:
        shutil.copyfile(art.file(name), dst / name)
    manifest = {**art.manifest, "files": files}
    (dst / af.MANIFEST).write_text(json.dumps(manifest, indent=2))


def _copy_tvm(dst: Path, *, cuda: bool) -> None:
    src = _package_dir("tvm")
    drop = set(TVM_DROP) if cuda else {*TVM_DROP, "lib/libtvm_runtime_cuda.so"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        rel = Path(folder).relative_to(src)
        return [n for n in names if (rel / n).as_posix() in drop
                or n == "__pycache__" or n.endswith(".pyc")]

    shutil.copytree(src, dst, ignore=ignore)
    if cuda:
        soname, path = find_cudart(dst / "lib" / "libtvm_runtime_cuda.so")
        shutil.copyfile(path, dst / "lib" / soname)


def find_cudart(library: Path) -> tuple[str, Path]:
    """The libcudart that `library` links (soname, file), as this machine's loader resolves it.
    Shipped beside it (its RUNPATH is $ORIGIN), the GPU host needs no CUDA toolkit."""
    out = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    m = re.search(r"(libcudart\.so\.\d+) => (\S+)", out)
    if not m or not Path(m.group(2)).is_file():
        raise KilnError(f"{library}: cannot find the libcudart it links (is the CUDA toolkit "
                        "installed here?)")
    return m.group(1), Path(m.group(2))


def _copy_kiln(lib: Path) -> None:
    """The bundled kiln: the import closure of the runtime, with empty parent packages."""
    for name, src in kiln_closure().items():
        dst = lib / Path(*name.split(".")).with_suffix(".py")
        if src.name == "__init__.py":
            dst = dst.with_suffix("") / "__init__.py"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    for folder in [lib / "kiln", *(lib / "kiln").rglob("*")]:
        if folder.is_dir() and folder.name != "__pycache__" and not (
                folder / "__init__.py").exists():
            (folder / "__init__.py").write_text(f'"""kiln.{folder.name} (bundled subset)."""\n')
    (lib / "kiln" / "runtime" / "bundle" / LAUNCHER).unlink(missing_ok=True)


def kiln_closure() -> dict[str, Path]:
    """kiln module -> source file, for every module the runtime imports, transitively."""
    todo = [*KILN_ROOTS, *(f"{r}.{p.stem}" for r in KILN_ROOTS
                           for p in _package_dir(r).glob("*.py") if p.stem != "__init__")]
    seen: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name in seen or name.endswith(".kiln_run"):
            continue
        if name.startswith("kiln.codegen"):
            raise KilnError(f"the runtime imports {name}, which needs TVM's compiler")
        seen[name] = _module_file(name)
        todo += _kiln_imports(seen[name])
    return seen


def _kiln_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("kiln.")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kiln."):
            found.append(node.module)
            found += [f"{node.module}.{a.name}" for a in node.names
                      if _is_submodule(node.module, a.name)]
    return found


def _is_submodule(package: str, name: str) -> bool:
    """Whether `from package import name` names a module (found without importing it)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(d) / f"{name}.py").is_file() or (Path(d) / name / "__init__.py").is_file()
               for d in spec.submodule_search_locations)


def find_ffi_wheel(python: str) -> Path:
    """The apache-tvm-ffi wheel for CPython `python` on manylinux x86_64: cached, else fetched
    with `pip download` into ~/.cache/kiln/wheels."""
    tag = "cp" + python.replace(".", "")
    pattern = f"apache_tvm_ffi-{FFI_VERSION}-{tag}-*x86_64*.whl"
    found = sorted(WHEELS.glob(pattern))
    if found:
        return found[-1]
    WHEELS.mkdir(parents=True, exist_ok=True)
    if python == f"{sys.version_info.major}.{sys.version_info.minor}":
        return wheel_from_installed(WHEELS)
    cmd = [sys.executable, "-m", "pip", "download", f"{FFI_DIST}=={FFI_VERSION}", "--no-deps",
           "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
           "-d", str(WHEELS)]
    for n in (17, 24, 28):  # pip matches each manylinux level exactly
        cmd += ["--platform", f"manylinux_2_{n}_x86_64"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(WHEELS.glob(pattern))
    if p.returncode != 0 or not found:
        last = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise KilnError(f"cannot download {FFI_DIST}=={FFI_VERSION} for Python {python}: "
                        f"{last} (or put the wheel into {WHEELS})")
    return found[-1]


def wheel_from_installed(dest: Path) -> Path:
    """Zip this interpreter's installed apache-tvm-ffi back into a wheel (no network needed;
    valid for this Python only)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(FFI_DIST)
    except PackageNotFoundError as e:
        raise KilnError(f"{FFI_DIST} is not installed here") from e
    if dist.version != FFI_VERSION:
        raise KilnError(f"{FFI_DIST} {dist.version} is installed; bundles pin {FFI_VERSION}")
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheel = dest / f"apache_tvm_ffi-{FFI_VERSION}-{tag}-{tag}-linux_x86_64.whl"
    tmp = wheel.with_suffix(".partial")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in dist.files or []:
            if ".." not in f.parts and "__pycache__" not in f.parts:
                z.write(f.locate(), f.as_posix())
    os.replace(tmp, wheel)
    return wheel


# -- helpers ------------------------------------------------------------------------------------

def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise KilnError(f"module {name} is not installed")
    return Path(spec.origin)


def _launcher() -> Path:
    return _package_dir("kiln.runtime.bundle") / LAUNCHER


def _write_info(stage: Path, art: af.Artifact, *, python: str, wheel: str, params: bool,
                sizes: dict[str, int]) -> None:
    from importlib.metadata import version

    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "python": python,
            "ffi_wheel": wheel, "tvm_version": version("apache-tvm"),
            "kiln_version": art.manifest.get("kiln_version"),
            "target": art.manifest["target"], "params": params and art.has_params,
            "sizes": sizes}
    (stage / "bundle.json").write_text(json.dumps(info, indent=2))


def _replace(stage: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
