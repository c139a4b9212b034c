"""`kiln convert` where only numpy is: an artifact's parameters from the model's weights file.

The manifest says how each weight derives from the ONNX model's external data
(kiln.compiler.ir's `describe`), as a tree:

    {"kind": "external", "path": P, "offset": O, "dtype": D, "shape": S}   raw bytes of file P
    {"kind": "derived", "fn": F, "attrs": {...}, "sources": [tree, ...]}   F(*sources, **attrs)

This module evaluates the trees with numpy (TRANSFORMS: the twins of the compiler's
PARAM_TRANSFORMS, GPTQ's calibration excepted) and writes the parameter file `kiln convert`
writes: the same tensors, bit for bit. bfloat16 values are carried as float32 (numpy has no
bfloat16), rounded to bfloat16 wherever the compiler computes in it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime import transforms
from kiln.runtime.params import bfloat16_bits, to_float32, write_safetensors
from kiln.runtime.pruning import prune_magnitude
from kiln.runtime.quant_format import CLIP_SEARCH, quantize_rtn

Progress = Callable[[str], None]
Value = tuple[np.ndarray, str]  # an array and its dtype ("bfloat16": float32 holding bf16)


def _quantize(w: np.ndarray, *, bits: int, group: int, symmetric: bool, part: str) -> np.ndarray:
    return _parts(w, bits=bits, group=group, symmetric=symmetric)[part]


#: rows quantized at a time: the clip search holds several float32 copies of what it quantizes
#: (rows are independent, so the codes are the same)
QUANTIZE_ELEMENTS = 1 << 22


def _parts(w: np.ndarray, *, bits: int, group: int, symmetric: bool) -> dict[str, np.ndarray]:
    rows = max(1, QUANTIZE_ELEMENTS // max(1, w.shape[1]))
    chunks = [quantize_rtn(np.asarray(w[i:i + rows], np.float32), bits=bits, group=group,
                           symmetric=symmetric, clip=CLIP_SEARCH)
              for i in range(0, w.shape[0], rows)]
    q, scales, zp = (None if c[0] is None else np.concatenate(c) for c in zip(*chunks,
                                                                              strict=True))
    return {"qweight": q, "scales": scales, "zero_points": zp}


def _cast(a: np.ndarray, dtype: str) -> np.ndarray:
    return _round_bf16(a) if dtype == "bfloat16" else a.astype(dtype)


#: fn -> numpy function, as kiln.compiler.ir.PARAM_TRANSFORMS and the passes that add to it
#: (passes/quantize.py, compiler/frontend/onnx_quant_import.py) define them; the evaluator
#: computes the parts of one quantized weight once (_Evaluator._quantized)
TRANSFORMS: dict[str, Callable[..., np.ndarray]] = {
    **transforms.LAYOUT, **transforms.QUANT_LAYOUT, **transforms.QUANT_IMPORT,
    **transforms.SPARSE,
    "cast": _cast,
    "quantize": _quantize,
    "prune_magnitude": prune_magnitude,
}
#: pruning that needs the compiler's calibration (kiln.passes.prune_weights)
_CALIBRATED_PRUNING = {"sparsegpt": "SparseGPT", "prune_wanda": "Wanda"}
#: the transforms whose result has their (first) input's dtype
_SAME_DTYPE = {"transpose", "reshape", "slice", "concat", "scale", "add_scalar",
               "quant_blocked", "broadcast_to", "prune_magnitude"}
#: the dtypes it reads and computes in, and their sizes in bytes
_ITEMSIZE = {**{d: np.dtype(d).itemsize for d in ("float32", "float16", "float64", "int64",
                                                  "int32", "int16", "int8", "uint8", "bool")},
             "bfloat16": 2}


def _round_bf16(a: np.ndarray) -> np.ndarray:
    """float values rounded to bfloat16 (to nearest even), held as float32."""
    return to_float32(bfloat16_bits(np.asarray(a, np.float32)))


# -- checking the trees before any work --------------------------------------------------------

def _leaves(tree: dict) -> list[dict]:
    if tree.get("kind") == "external":
        return [tree]
    return [leaf for s in tree.get("sources", []) for leaf in _leaves(s)]


def _check_tree(name: str, tree: dict, calibrated: bool) -> None:
    """Refuse, naming the parameter, what numpy alone cannot derive (`calibrated`: `kiln
    convert` would solve this artifact's quantized weights with GPTQ)."""
    kind = tree.get("kind")
    if kind == "external":
        if "dtype" not in tree or "shape" not in tree:
            raise KilnError(f"parameter {name}: the manifest does not record its source's dtype "
                            "and shape (an older kiln); recompile with this kiln")
        if tree["dtype"] not in _ITEMSIZE:
            raise KilnError(f"parameter {name}: source dtype {tree['dtype']} is not supported "
                            "without the compiler; run `kiln convert` on the build machine")
        return
    if kind != "derived":
        where = {"inline": "embedded in the ONNX file itself, not in its external data",
                 "computed": "computed by the compiler"}.get(kind, f"of kind {kind!r}")
        raise KilnError(f"parameter {name}: its data is {where}; run `kiln convert MODEL "
                        "ARTIFACT` on the build machine")
    fn = tree.get("fn")
    if fn in _CALIBRATED_PRUNING:
        raise KilnError(f"parameter {name}: pruned by {_CALIBRATED_PRUNING[fn]}, whose "
                        "calibration needs the compiler; run `kiln convert MODEL ARTIFACT` on the "
                        "build machine (or compile with --prune-method magnitude)")
    if fn == "gptq" or (fn == "quantize" and calibrated):
        raise KilnError(f"parameter {name}: GPTQ-quantized, and GPTQ's calibration needs the "
                        "compiler; run `kiln convert MODEL ARTIFACT` on the build machine (or "
                        "compile with a -rtn preset)")
    if fn not in TRANSFORMS:
        raise KilnError(f"parameter {name}: transform {fn!r} is unknown to this runtime; run "
                        "`kiln convert` on the build machine")
    if fn == "cast" and tree.get("attrs", {}).get("dtype") not in _ITEMSIZE:
        raise KilnError(f"parameter {name}: a cast to {tree.get('attrs', {}).get('dtype')} "
                        "needs the compiler; run `kiln convert` on the build machine")
    for s in tree.get("sources", []):
        _check_tree(name, s, calibrated)


def _calibrated(manifest: dict) -> bool:
    """Whether `kiln convert` would solve the quantized weights with GPTQ: the preset says so
    and the model has a tokenizer (compile copies it into the artifact; without one, `kiln
    convert` rounds to nearest, as this module does). A --no-weights compile records such
    weights as rounded to nearest: the weights were not there to calibrate with."""
    q = manifest.get("quant")
    return bool(q) and q.get("method", "gptq") == "gptq" and af.TOKENIZER in manifest["files"]


def _data_files(leaves: list[dict], weights: Path) -> dict[str, Path]:
    """Recorded data file -> the file on this machine: WEIGHTS itself, or the file of the
    recorded name inside the folder WEIGHTS."""
    recorded = sorted({leaf["path"] for leaf in leaves})
    if weights.is_dir():
        return {r: weights / Path(r).name for r in recorded}
    if not weights.exists():
        raise KilnError(f"{weights}: no such weights file or folder")
    if len({Path(r).name for r in recorded}) > 1:
        raise KilnError(f"{weights}: the artifact's weights are in {len(recorded)} files ("
                        f"{', '.join(Path(r).name for r in recorded)}); pass the folder that "
                        "holds them")
    return dict.fromkeys(recorded, weights)


def _check_leaves(params: list[dict], files: dict[str, Path]) -> None:
    sizes: dict[Path, int] = {}
    for p in params:
        for leaf in _leaves(p["derivation"]):
            path = files[leaf["path"]]
            if path not in sizes:
                if not path.is_file():
                    raise KilnError(f"{path}: weights file missing (the model's external data "
                                    f"{Path(leaf['path']).name})")
                sizes[path] = path.stat().st_size
            end = int(leaf["offset"]) + _nbytes(leaf)
            if end > sizes[path]:
                raise KilnError(f"{path}: has {sizes[path]} bytes; parameter {p['name']} "
                                f"needs bytes [{leaf['offset']}, {end}) (truncated, or not "
                                "this model's weights)")


def _nbytes(leaf: dict) -> int:
    return int(np.prod(leaf["shape"], dtype=np.int64)) * _ITEMSIZE[leaf["dtype"]]


# -- evaluating ----------------------------------------------------------------------------------

class _Evaluator:
    """Evaluates derivation trees; a quantized weight's parts (qweight, scales, zero points)
    share one quantization, kept until its last part is taken."""

    def __init__(self, files: dict[str, Path], params: list[dict]):
        self.files = files
        self.quantized: dict[str, dict[str, np.ndarray]] = {}
        self.uses: dict[str, int] = {}
        for p in params:
            for key in self._quantize_keys(p["derivation"]):
                self.uses[key] = self.uses.get(key, 0) + 1

    def _quantize_keys(self, tree: dict) -> list[str]:
        keys = [k for s in tree.get("sources", []) for k in self._quantize_keys(s)]
        return keys + ([_quantize_key(tree)] if tree.get("fn") == "quantize" else [])

    def value(self, tree: dict) -> Value:
        if tree["kind"] == "external":
            return self._read(tree)
        fn, attrs = tree["fn"], dict(tree.get("attrs", {}))
        if fn == "quantize":
            return self._quantized(tree, attrs)
        args = [self.value(s) for s in tree["sources"]]
        dtype = args[0][1] if fn in _SAME_DTYPE or (fn == "sparse_encode" and
                                                   attrs.get("part") == "values") else None
        if dtype == "bfloat16" and fn in ("scale", "add_scalar"):  # bfloat16 arithmetic
            key = "factor" if fn == "scale" else "value"
            attrs[key] = float(_round_bf16(np.float32([attrs[key]]))[0])  # as ml_dtypes does
            out = _round_bf16(TRANSFORMS[fn](*(a for a, _ in args), **attrs))
        else:
            out = TRANSFORMS[fn](*(a for a, _ in args), **attrs)
        return out, dtype or (attrs["dtype"] if fn == "cast" else str(out.dtype))

    def _read(self, leaf: dict) -> Value:
        dtype, shape = leaf["dtype"], tuple(leaf["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        try:
            raw = np.fromfile(self.files[leaf["path"]], dtype=np.uint16 if dtype == "bfloat16"
                              else dtype, count=count, offset=int(leaf["offset"]))
        except OSError as e:
            raise KilnError(f"{self.files[leaf['path']]}: cannot read ({e.strerror or e})") from e
        if raw.size != count:
            raise KilnError(f"{self.files[leaf['path']]}: ends inside tensor at offset "
                            f"{leaf['offset']}")
        return (to_float32(raw) if dtype == "bfloat16" else raw).reshape(shape), dtype

    def _quantized(self, tree: dict, attrs: dict) -> Value:
        key = _quantize_key(tree)
        if key not in self.quantized:
            w, _ = self.value(tree["sources"][0])
            self.quantized[key] = _parts(w, bits=int(attrs["bits"]), group=int(attrs["group"]),
                                         symmetric=bool(attrs["symmetric"]))
        out = self.quantized[key][attrs["part"]]
        self.uses[key] = self.uses.get(key, 1) - 1
        if self.uses[key] <= 0:
            del self.quantized[key]
        if out is None:
            raise KilnError(f"quantize: a symmetric scheme has no part {attrs['part']}")
        return out, str(out.dtype)


def _quantize_key(tree: dict) -> str:
    attrs = {k: v for k, v in tree.get("attrs", {}).items() if k != "part"}
    return json.dumps([attrs, tree["sources"]], sort_keys=True)


def _stored(value: Value, dtype: str) -> np.ndarray:
    """The array as the compiler stores it in `dtype` (bfloat16: its bits)."""
    a, have = value
    if dtype == "bfloat16":
        return bfloat16_bits(a.astype(np.float32, copy=False))
    return a if have == dtype else a.astype(dtype)


def derive(tree: dict, weights: str | Path, dtype: str, *, name: str = "?") -> np.ndarray:
    """One parameter: the array its derivation `tree` gives from `weights` (as for
    convert_artifact), in `dtype` as the parameter file stores it (bfloat16: its bits)."""
    _check_tree(name, tree, False)
    files = _data_files(_leaves(tree), Path(weights))
    _check_leaves([{"name": name, "derivation": tree}], files)
    return _stored(_Evaluator(files, []).value(tree), dtype)


# -- converting an artifact ----------------------------------------------------------------------

def convert_artifact(artifact: str | Path, weights: str | Path, *, out: str | Path | None = None,
                     progress: Progress = lambda msg: None) -> Path:
    """Write the parameters of `artifact` (compiled --no-weights) from `weights`: the model's
    external data file, or a folder holding it. In place (the manifest rewritten atomically),
    or with `out` into a converted copy. Returns the artifact directory written."""
    art = af.open_artifact(artifact, verify=False)
    # the kernels the new weights will run with must be intact (the weights are rewritten)
    af.check_files(art.path, art.manifest, skip=(af.PARAMS,))
    params = [p for p in art.manifest["params"] if p["file"] == af.PARAMS]
    calibrated = _calibrated(art.manifest)
    for p in params:
        _check_tree(p["name"], p["derivation"], calibrated)
    files = _data_files([leaf for p in params for leaf in _leaves(p["derivation"])],
                        Path(weights))
    _check_leaves(params, files)
    if out is None and not os.access(art.path, os.W_OK):
        raise KilnError(f"{art.path}: read-only; pass --out DIR for a converted copy")
    total = sum(int(np.prod(p["shape"], dtype=np.int64)) * _ITEMSIZE.get(p["dtype"], 1)
                for p in params)
    progress(f"converting {len(params)} parameters ({total / 1e6:.1f} MB) from "
             f"{', '.join(sorted({str(f) for f in files.values()}))}")
    try:
        return _convert(art, params, files, out, progress)
    except OSError as e:
        raise KilnError(f"{e.filename or out or art.path}: cannot write the converted "
                        f"parameters ({e.strerror or e})") from e


def _convert(art: af.Artifact, params: list[dict], files: dict[str, Path],
             out: str | Path | None, progress: Progress) -> Path:
    if out is None:
        tmp = art.path / (af.PARAMS + ".partial")
        try:
            _write(params, files, tmp, progress)
            af.add_params_file(art, tmp)
        finally:
            tmp.unlink(missing_ok=True)
        return art.path
    with af.ArtifactWriter(out) as w:
        for name, digest in art.manifest["files"].items():
            if name != af.PARAMS:
                w.copy(art.file(name), name)
                if w.files[name] != digest:
                    raise KilnError(f"{art.file(name)}: checksum mismatch (the artifact is "
                                    "corrupted)")
        _write(params, files, w.path(af.PARAMS), progress)
        w.add(af.PARAMS)
        keep = {k: v for k, v in art.manifest.items()
                if k not in ("format", "format_version", "files")}
        return w.commit(keep)


def _write(params: list[dict], files: dict[str, Path], path: Path, progress: Progress,
           every: float = 2.0) -> None:
    by_name = {p["name"]: p for p in params}
    ev = _Evaluator(files, params)
    start = last = time.perf_counter()
    done = 0

    def array(name: str) -> np.ndarray:
        nonlocal last, done
        p = by_name[name]
        try:
            a = _stored(ev.value(p["derivation"]), p["dtype"])
        except (ValueError, TypeError, IndexError, KeyError) as e:
            raise KilnError(f"parameter {name}: cannot derive it ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e
        if list(a.shape) != list(p["shape"]):
            raise KilnError(f"parameter {name}: the weights give shape {list(a.shape)}, the "
                            f"artifact expects {p['shape']} (not this model's weights?)")
        done += 1
        if time.perf_counter() - last >= every:
            last = time.perf_counter()
            progress(f"{done}/{len(params)} parameters ({last - start:.0f} s)")
        return a

    write_safetensors(path, [(p["name"], p["dtype"], p["shape"]) for p in params], array)
    progress(f"{len(params)} parameters written in {time.perf_counter() - start:.1f} s")

