"""The artifact: a directory holding kernels, parameters, tokenizer and a manifest that binds them.

    OUT/manifest.json        format + version, kiln version, target, architecture, entry points
                             and their I/O, KV-cache layout, the parameter table (name, shape,
                             dtype, role, how it derives from the model's weights), sha256 of
                             every other file
    OUT/kernels.so           the compiled library (TVM VM executable + kernels)
    OUT/params.safetensors   parameters, memory-mappable (absent when compiled --no-weights)
    OUT/tokenizer.json       when the model has one

The manifest is written last, inside a staging directory that is renamed into place: an
interrupted compile never leaves something that looks like a complete artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.compiler.errors import KilnError

FORMAT = "kiln-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
KERNELS = "kernels.so"
PARAMS = "params.safetensors"
TOKENIZER = "tokenizer.json"


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def has_params(self) -> bool:
        return PARAMS in self.manifest["files"]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def signature(self) -> dict[str, Any]:
        return self.manifest["signature"]

    @property
    def max_seq(self) -> int:
        return int(self.manifest["kv_cache"]["capacity"])


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_artifact(path: str | Path, *, verify: bool = True,
                  check_target: Callable[[dict], str | None] | None = None) -> Artifact:
    """Read and validate an artifact; every problem is a one-line KilnError naming the file."""
    path = Path(path)
    mpath = path / MANIFEST
    if not path.is_dir():
        raise KilnError(f"{path}: not an artifact directory")
    if not mpath.is_file():
        raise KilnError(f"{mpath}: missing (not a kiln artifact, or an interrupted compile)")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{mpath}: corrupt manifest ({e.__class__.__name__})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KilnError(f"{mpath}: not a kiln artifact manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise KilnError(f"{mpath}: artifact format version {version!r} is not supported by "
                        f"this runtime (it reads version {FORMAT_VERSION}); recompile")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise KilnError(f"{f}: missing from the artifact")
        if verify and sha256(f) != digest:
            raise KilnError(f"{f}: checksum mismatch (the artifact is corrupted)")
    if check_target is not None:
        problem = check_target(manifest["target"])
        if problem:
            raise KilnError(f"{path}: compiled for {manifest['target'].get('name')}, "
                            f"which this machine cannot run: {problem}")
    return Artifact(path, manifest)


class ArtifactWriter:
    """Stage files in a temporary sibling directory; `commit` writes the manifest and renames."""

    def __init__(self, out: str | Path):
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-",
                                           dir=self.out.parent))
        self.files: dict[str, str] = {}

    def path(self, name: str) -> Path:
        return self.stage / name

    def add(self, name: str) -> None:
        """Record a file written into the stage (its checksum goes into the manifest)."""
        self.files[name] = sha256(self.stage / name)

    def copy(self, src: Path, name: str) -> None:
        shutil.copyfile(src, self.stage / name)
        self.add(name)

    def commit(self, manifest: dict[str, Any]) -> Path:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "files": dict(self.files)}
        tmp = self.stage / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
        os.replace(tmp, self.stage / MANIFEST)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.stage, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.stage.exists():
            self.abort()


def add_params_file(artifact: Artifact, src: Path) -> None:
    """Install a parameter file into an artifact compiled --no-weights (manifest rewritten
    atomically, with the new checksum)."""
    dst = artifact.path / PARAMS
    tmp = artifact.path / (PARAMS + ".partial")
    shutil.copyfile(src, tmp) if src != tmp else None
    manifest = dict(artifact.manifest)
    manifest["files"] = {**manifest["files"], PARAMS: sha256(tmp)}
    os.replace(tmp, dst)
    mtmp = artifact.path / (MANIFEST + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=2))
    os.replace(mtmp, artifact.path / MANIFEST)
