"""The parameter transforms that need numpy alone, one copy for both their users: the compiler
derives parameters with them (kiln.compiler.ir.PARAM_TRANSFORMS, and the passes and importers
that register more) and the GPU host's converter replays the recorded derivations with them
(kiln.runtime.convert), so the two give the same bytes by construction."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kiln.runtime import quant_format as qf
from kiln.runtime import sparse_format
from kiln.runtime.quant_format import blocked as blocked


def nibble_zero_points(zp: np.ndarray, *, n: int, groups: int) -> np.ndarray:
    """MatMulNBits' packed uint4 zero points [N * ceil(G / 2)] -> float32[N, G]."""
    return qf.unpack_nibbles(np.asarray(zp).reshape(n, -1))[:, :groups].astype(np.float32)


#: layout and arithmetic transforms (the graph's own)
LAYOUT: dict[str, Callable[..., np.ndarray]] = {
    "transpose": lambda a, perm=None: np.ascontiguousarray(np.transpose(a, perm)),
    "reshape": lambda a, shape: a.reshape(shape),
    "slice": lambda a, axis, start, stop: np.ascontiguousarray(
        np.take(a, np.arange(start, stop), axis=axis)),
    "concat": lambda *arrs, axis: np.concatenate(arrs, axis=axis),
    "scale": lambda a, factor: (a * np.asarray(factor, a.dtype)).astype(a.dtype),
    "add_scalar": lambda a, value: (a + np.asarray(value, a.dtype)).astype(a.dtype),
}

#: the CPU kernels' weight layout (registered by kiln.passes.quantize)
QUANT_LAYOUT: dict[str, Callable[..., np.ndarray]] = {
    "quant_blocked": lambda a, block: blocked(np.asarray(a), block),
}

#: what the import of onnxruntime-quantized models derives (kiln.compiler.frontend's
#: onnx_quant_import registers them)
QUANT_IMPORT: dict[str, Callable[..., np.ndarray]] = {
    "nibble_zero_points": nibble_zero_points,
    "astype_float32": lambda a: np.asarray(a).astype(np.float32),
    "uint8_to_int8": lambda a: (np.asarray(a).astype(np.int16) - qf.INT8_SHIFT).astype(np.int8),
    "broadcast_to": lambda a, shape: np.ascontiguousarray(
        np.broadcast_to(np.asarray(a).reshape(-1)[:1].reshape(1, 1), shape)),
}

#: the sparse layouts of sparse_linear (kiln.runtime.sparse_format; kiln.passes.sparsify derives
#: its parameters with them)
SPARSE: dict[str, Callable[..., np.ndarray]] = {
    "sparse_encode": sparse_format.encode_part,
}
