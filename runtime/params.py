"""Parameters for the runtime: read a safetensors file by memory map, or synthesize seeded ones.

The runtime may import only numpy, tokenizers and the TVM runtime, so it reads safetensors'
simple layout itself (8-byte little-endian header length, a JSON header of name -> dtype, shape,
byte offsets, then the raw data); the compiler writes the file with the safetensors library.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError

_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


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
        if dtype is None:
            raise KilnError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = data[start:end].view(dtype).reshape(info["shape"])
    return out


def synthetic_params(table: list[dict], seed: int) -> dict[str, np.ndarray]:
    """Seeded random parameters of the manifest's shapes, scaled by role so that activations
    stay in range: norm weights near 1, biases near 0, matrices ~ N(0, 1/fan_in)."""
    out = {}
    for i, p in enumerate(table):
        rng = np.random.default_rng([seed, i])
        shape, dtype = tuple(p["shape"]), np.dtype(p["dtype"])
        role = p.get("role", "")
        if not np.issubdtype(dtype, np.floating):
            raise KilnError(f"parameter {p['name']}: cannot synthesize dtype {dtype}")
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
        out[p["name"]] = x.astype(dtype)
    return out
