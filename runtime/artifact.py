"""The artifact: a directory holding kernels, parameters, tokenizer and a manifest that binds them.

    OUT/manifest.json        format + version, kiln version, target, architecture, entry points
                             and their I/O, KV-cache layout, the parameter table (name, shape,
                             dtype, role, how it derives from the model's weights), sha256 and
                             size of every other file (sizes checked at every load, digests
                             unless the caller opts out: `Session.load(..., verify=False)`)
    OUT/kernels.so           the compiled library (TVM VM executable + kernels)
    OUT/params.safetensors   parameters, memory-mappable (absent when compiled --no-weights)
    OUT/tokenizer.json       when the model has one

The manifest is written last, inside a staging directory that is renamed into place: an
interrupted compile never leaves something that looks like a complete artifact, and two compiles
into one OUT never mix their files (the rename of a whole directory is atomic; an existing OUT is
refused unless the writer may replace it, and only a kiln artifact or an empty folder is replaced).
"""

from __future__ import annotations

import contextlib
import errno
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
    check_files(path, manifest, verify=verify)
    if check_target is not None:
        problem = check_target(manifest["target"])
        if problem:
            raise KilnError(f"{path}: compiled for {manifest['target'].get('name')}, "
                            f"which this machine cannot run: {problem}")
    return Artifact(path, manifest)


def check_files(path: Path, manifest: dict[str, Any], *, verify: bool = True,
                skip: tuple[str, ...] = ()) -> None:
    """Every file the manifest lists exists with its recorded size and (`verify`) sha256."""
    files, sizes = manifest.get("files", {}), manifest.get("file_sizes", {})
    if not isinstance(files, dict) or not isinstance(sizes, dict):
        raise KilnError(f"{path / MANIFEST}: corrupt manifest (files)")
    for name, digest in files.items():
        f = path / name
        if name in skip:
            continue
        if not f.is_file():
            raise KilnError(f"{f}: missing from the artifact")
        size = f.stat().st_size
        if name in sizes and size != sizes[name]:
            raise KilnError(f"{f}: {size} bytes, the manifest records {sizes[name]} (truncated "
                            "or replaced; the artifact is corrupted)")
        if verify and sha256(f) != digest:
            raise KilnError(f"{f}: checksum mismatch (modified, or from another artifact: "
                            "the artifact is corrupted)")


def _is_replaceable(out: Path) -> bool:
    """Only a kiln artifact (or an empty folder) may be replaced: never someone's directory."""
    return out.is_dir() and (not any(out.iterdir()) or (out / MANIFEST).is_file())


def check_out(out: Path, *, force: bool) -> None:
    """Refuse OUT before the work starts: it exists and `force` is off, or it is not ours."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise KilnError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not force:
        raise KilnError(f"{out}: already exists; pass --force to replace it")
    if not _is_replaceable(out):
        raise KilnError(f"{out}: exists and is not a kiln artifact; refusing to replace it "
                        "even with --force")


class ArtifactWriter:
    """Stage files in a temporary sibling directory; `commit` writes the manifest and renames."""

    def __init__(self, out: str | Path, *, force: bool = True):
        self.out = Path(out)
        self.force = force
        check_out(self.out, force=force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-",
                                           dir=self.out.parent))
        self.files: dict[str, str] = {}
        self.sizes: dict[str, int] = {}

    def path(self, name: str) -> Path:
        return self.stage / name

    def add(self, name: str) -> None:
        """Record a file written into the stage (its checksum goes into the manifest)."""
        self.files[name] = sha256(self.stage / name)
        self.sizes[name] = (self.stage / name).stat().st_size

    def copy(self, src: Path, name: str) -> None:
        shutil.copyfile(src, self.stage / name)
        self.add(name)

    def commit(self, manifest: dict[str, Any]) -> Path:
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest,
                    "files": dict(self.files), "file_sizes": dict(self.sizes)}
        tmp = self.stage / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
        os.replace(tmp, self.stage / MANIFEST)
        self._install()
        return self.out

    def _install(self) -> None:
        """Rename the stage into place. rename(2) onto a directory succeeds only while it is
        empty, so a concurrent writer that got there first is seen here, not overwritten;
        with `force`, the old artifact is first moved aside whole (readers that opened its
        files keep them), and a race with another forced writer is retried."""
        for _ in range(20):
            try:
                os.rename(self.stage, self.out)  # onto nothing, or onto an empty folder
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            if not self.force:
                raise KilnError(f"{self.out}: another compile wrote it meanwhile; pass --force "
                                "to replace it")
            if not _is_replaceable(self.out):
                raise KilnError(f"{self.out}: exists and is not a kiln artifact; refusing to "
                                "replace it even with --force")
            old = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.old-", dir=self.out.parent))
            with contextlib.suppress(FileNotFoundError):  # another writer moved it first
                os.rename(self.out, old / "artifact")
            shutil.rmtree(old, ignore_errors=True)
        raise KilnError(f"{self.out}: could not be replaced (other writers kept replacing it)")

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
    manifest["file_sizes"] = {**manifest.get("file_sizes", {}), PARAMS: tmp.stat().st_size}
    os.replace(tmp, dst)
    mtmp = artifact.path / (MANIFEST + ".tmp")
    mtmp.write_text(json.dumps(manifest, indent=2))
    os.replace(mtmp, artifact.path / MANIFEST)
