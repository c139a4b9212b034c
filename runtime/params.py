"""Parameters for the runtime: read a safetensors file by memory map, write one, or synthesize
seeded ones (quantized ones with kiln.runtime.quant_format's quantizer, re-exported here).

The runtime may import only numpy, tokenizers and the TVM runtime, so it reads and writes
safetensors' simple layout itself (8-byte little-endian header length, a JSON header of name ->
dtype, shape, byte offsets, then the raw data); the compiler writes the file with the
safetensors library, and write_safetensors writes the same bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.runtime import quant_format as qf
from kiln.runtime.quant_format import CLIP_SEARCH as CLIP_SEARCH
from kiln.runtime.quant_format import dequantize as dequantize
from kiln.runtime.quant_format import pack_nibbles as pack_nibbles
from kiln.runtime.quant_format import quantize_codes as quantize_codes
from kiln.runtime.quant_format import quantize_rtn as quantize_rtn

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
           "U16": np.uint16}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only array view into the memory-mapped file."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: not a valid parameter file ({e.__class__.__name__})") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None and info["dtype"] == "BF16":  # numpy has none: see as_float
            dtype = bfloat16_dtype()
        if dtype is None:
            raise KilnError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


#: safetensors' dtype names of manifest dtypes, in the order the safetensors library sorts them
#: (narrowest first; it lays tensors out widest first, so that every tensor stays aligned)
_CODES = {"bool": "BOOL", "uint8": "U8", "int8": "I8", "int16": "I16", "uint16": "U16",
          "float16": "F16", "bfloat16": "BF16", "int32": "I32", "uint32": "U32",
          "float32": "F32", "float64": "F64", "int64": "I64", "uint64": "U64"}
_RANK = {code: i for i, code in enumerate(_CODES.values())}


def write_safetensors(path: Path, tensors: list[tuple[str, str, list[int]]],
                      array: Callable[[str], np.ndarray]) -> None:
    """Write (name, dtype, shape) tensors, asking `array(name)` for each one's data in their
    order (only one is in memory at a time), laid out byte for byte as the safetensors library
    lays them out: widest dtype first, then by name (so every tensor is aligned), after a
    compact JSON header in that order padded with spaces to 8 bytes. bfloat16 data is its
    16-bit pattern (ml_dtypes' bfloat16, or uint16 bits)."""
    for name, dtype, _ in tensors:
        if dtype not in _CODES:
            raise KilnError(f"{path}: tensor {name} has dtype {dtype}, which cannot be written")
    order = sorted(tensors, key=lambda t: (-_RANK[_CODES[t[1]]], t[0]))
    header, offset = {}, 0
    for name, dtype, shape in order:
        size = int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "bfloat16" else
                                                      np.dtype(dtype).itemsize)
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
        for name, _, _ in tensors:  # asked in the caller's order, each put in its place
            data = np.ascontiguousarray(array(name))
            start, end = header[name]["data_offsets"]
            if data.nbytes != end - start:
                raise KilnError(f"{path}: tensor {name} has {data.nbytes} bytes, its header "
                                f"says {end - start}")
            f.seek(8 + len(text) + start)
            f.write(data.tobytes())


def synthetic_params(table: list[dict], seed: int) -> dict[str, np.ndarray]:
    """Seeded random parameters of the manifest's shapes, scaled by role so that activations
    stay in range: norm weights near 1, biases near 0, matrices ~ N(0, 1/fan_in).

    Quantized weights (a qweight/scales[/zero_points] triple derived by `quantize`) are made
    from a seeded float matrix rounded to nearest in the artifact's scheme (quantize_rtn), so
    that `dequantize` of them is a plain weight of the model; bfloat16 is rounded from float32
    (bfloat16_bits)."""
    out: dict[str, np.ndarray] = {}
    quantized: dict[str, dict[str, tuple[int, dict]]] = {}
    sparse: dict[str, dict[str, tuple[int, dict]]] = {}
    for i, p in enumerate(table):
        part = _quant_part(p)
        if part is not None:
            quantized.setdefault(p["name"][: -len(part) - 1], {})[part] = (i, p)
            continue
        part = sparse_part(p)
        if part is not None:  # values and meta of one weight: derived from the same source
            key = json.dumps(p["derivation"]["sources"], sort_keys=True)
            sparse.setdefault(key, {})[part] = (i, p)
            continue
        rng = np.random.default_rng([seed, i])
        shape, role = tuple(p["shape"]), p.get("role", "")
        if p["dtype"] != "bfloat16" and not np.issubdtype(np.dtype(p["dtype"]), np.floating):
            raise KilnError(f"parameter {p['name']}: cannot synthesize dtype {p['dtype']}")
        x = rng.standard_normal(shape, dtype=np.float32)
        if role.endswith("norm.weight"):
            x = 1.0 + 0.05 * x
        elif role.endswith("bias"):
            x = 0.02 * x
        elif role == "table":  # precomputed per-position tables cannot be random
            raise KilnError(f"parameter {p['name']}: a computed table; it must come from the "
                            "compiler (kept in the kernels' parameter file)")
        elif len(shape) >= 2:
            x = x / np.sqrt(shape[-1])
        else:
            x = 0.02 * x
        out[p["name"]] = as_float(x, p["dtype"])
    for base, parts in quantized.items():
        out.update(_synthetic_quantized(base, parts, seed))
    for parts in sparse.values():
        out.update(_synthetic_sparse(parts, seed))
    return out


# -- sparse weights (sparse_linear's layouts, kiln.runtime.sparse_format) ---------------------

def sparse_part(p: dict) -> str | None:
    """"values" or "meta" for a parameter derived by the `sparse_encode` transform, else None."""
    d = p.get("derivation")
    if isinstance(d, dict) and d.get("kind") == "derived" and d.get("fn") == "sparse_encode":
        part = d.get("attrs", {}).get("part")
        return part if part in ("values", "meta") else None
    return None


def _synthetic_sparse(parts: dict[str, tuple[int, dict]], seed: int) -> dict[str, np.ndarray]:
    """A seeded N(0, 1/K) matrix pruned 2:4 by magnitude, in the `nm` layout: what a pruned
    checkpoint compiled to 2:4 kernels holds (the values in the parameter's dtype)."""
    from kiln.runtime.pruning import prune_magnitude
    from kiln.runtime.sparse_format import nm_encode

    if set(parts) != {"values", "meta"}:
        raise KilnError(f"parameter {next(iter(parts.values()))[1]['name']}: a sparse weight "
                        "needs its values and meta")
    i, v = parts["values"]
    layout = v["derivation"]["attrs"].get("layout")
    if layout == "bitmap" and v["dtype"] == "float32":
        return _synthetic_bitmap(v, parts["meta"][1], seed, i)
    if layout != "nm":
        raise KilnError(f"parameter {v['name']}: cannot synthesize the {layout!r} sparse layout "
                        f"with {v['dtype']} values (2:4 `nm`, and fp32 `bitmap`)")
    n, k = v["shape"][0], 2 * v["shape"][1]
    w = np.random.default_rng([seed, i]).standard_normal((n, k), dtype=np.float32)
    values, meta = nm_encode(prune_magnitude(w / np.sqrt(k), fraction=0.5, n=2, m=4))
    return {v["name"]: as_float(values, v["dtype"]), parts["meta"][1]["name"]: meta}


def _synthetic_bitmap(v: dict, meta: dict, seed: int, i: int) -> dict[str, np.ndarray]:
    """A seeded N(0, 1/K) matrix with the same number of zeros in every row, as many as the
    layout's capacity says (C = 16 x non-zeros per row + 16), pruned by magnitude."""
    from kiln.runtime.pruning import prune_magnitude
    from kiln.runtime.sparse_format import BLOCK, bitmap_encode

    (blocks, k), capacity = meta["shape"], v["shape"][1]
    kept = min(k, max(0, (capacity - BLOCK) // BLOCK))
    w = np.random.default_rng([seed, i]).standard_normal((blocks * BLOCK, k), dtype=np.float32)
    w = w / np.float32(np.sqrt(k))
    w = prune_magnitude(w, fraction=(k - kept) / k) if kept < k else w
    values, bits = bitmap_encode(w, capacity)
    return {v["name"]: values, meta["name"]: bits}


# -- quantized weights (kiln.runtime.quant_format, `nk` layout) ------------------------------

_QUANT_PARTS = ("qweight", "scales", "zero_points")


def _quant_part(p: dict) -> str | None:
    d = p.get("derivation")
    if isinstance(d, dict) and d.get("kind") == "derived" and d.get("fn") == "quantize":
        part = d.get("attrs", {}).get("part")
        return part if part in _QUANT_PARTS and p["name"].endswith("." + part) else None
    return None


def _synthetic_quantized(base: str, parts: dict[str, tuple[int, dict]], seed: int,
                         ) -> dict[str, np.ndarray]:
    if "qweight" not in parts or "scales" not in parts:
        raise KilnError(f"parameter {base}: a quantized weight needs qweight and scales")
    i, q = parts["qweight"]
    attrs = q["derivation"]["attrs"]
    bits, symmetric = int(attrs["bits"]), bool(attrs.get("symmetric", True))
    n, cols = q["shape"]
    kp = qf.unpacked_columns(cols, bits)
    groups = parts["scales"][1]["shape"][1]
    w = np.random.default_rng([seed, i]).standard_normal((n, kp), dtype=np.float32)
    codes, scales, zp = quantize_rtn(w / np.sqrt(kp), bits=bits, group=kp // groups,
                                     symmetric=symmetric)
    out = {q["name"]: codes, parts["scales"][1]["name"]: as_float(scales,
                                                                  parts["scales"][1]["dtype"])}
    if "zero_points" in parts:
        out[parts["zero_points"][1]["name"]] = as_float(zp, parts["zero_points"][1]["dtype"])
    elif zp is not None:
        raise KilnError(f"parameter {base}: asymmetric scheme without zero points")
    return out


# -- bfloat16 without numpy support for it ----------------------------------------------------

def bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> the uint16 bits of bfloat16, rounded to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(x), np.uint16(0x7FC0), rounded).astype(np.uint16)


def bfloat16_dtype() -> np.dtype:
    """ml_dtypes' bfloat16 when installed (the TVM runtime uploads it), else uint16 (its bits)."""
    try:
        import ml_dtypes
    except ImportError:
        return np.dtype(np.uint16)
    return np.dtype(ml_dtypes.bfloat16)


def as_float(x: np.ndarray, dtype: str) -> np.ndarray:
    """x in float dtype `dtype`; bfloat16 rounded from float32 (bfloat16_bits), typed as
    bfloat16_dtype says."""
    if dtype != "bfloat16":
        return x.astype(dtype)
    return bfloat16_bits(x).view(bfloat16_dtype())


def to_float32(x: np.ndarray) -> np.ndarray:
    """Any float array (bfloat16 as ml_dtypes or uint16 bits included) as float32."""
    if x.dtype == np.uint16 or x.dtype.name == "bfloat16":
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32)
