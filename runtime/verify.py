"""`kiln verify ART`: every file of an artifact against the manifest (size, sha256) and every
parameter file's tensors against the manifest's parameter table, without loading any kernels."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.params import bfloat16_dtype, read_safetensors

CONSTANTS = "constants.safetensors"


@dataclass(frozen=True)
class Verified:
    path: Path
    files: dict[str, int]  # name -> bytes, each matching its recorded size and sha256
    params: int  # parameters whose name, dtype and shape match the table
    has_weights: bool  # False: compiled --no-weights and not yet converted


def verify_artifact(path: str | Path) -> Verified:
    """Check ART completely; the first problem is a one-line KilnError naming the file."""
    art = af.open_artifact(path, verify=True)
    table = art.manifest.get("params", [])
    checked = 0
    for name in (CONSTANTS, af.PARAMS):
        if name not in art.manifest["files"]:
            continue
        want = {p["name"]: p for p in table if p.get("file") == name}
        checked += _check_tensors(art.file(name), want)
    files = {n: art.file(n).stat().st_size for n in art.manifest["files"]}
    return Verified(art.path, files, checked, art.has_params)


def _check_tensors(path: Path, want: dict[str, dict]) -> int:
    try:
        have = read_safetensors(path)
    except (ValueError, TypeError, KeyError) as e:  # a header naming impossible offsets
        raise KilnError(f"{path}: not a valid parameter file ({type(e).__name__})") from e
    missing = sorted(set(want) - set(have))
    if missing:
        raise KilnError(f"{path}: lacks parameter {missing[0]} ({len(missing)} missing)")
    for name, p in want.items():
        a = have[name]
        dtype = bfloat16_dtype() if p["dtype"] == "bfloat16" else p["dtype"]
        if list(a.shape) != list(p["shape"]) or a.dtype != dtype:
            raise KilnError(f"{path}: parameter {name} is {a.dtype}{list(a.shape)}, the "
                            f"manifest says {p['dtype']}{p['shape']}")
    return len(want)
