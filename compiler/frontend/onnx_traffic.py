"""Weight bytes an ONNX decoder reads per decoded token: the counterpart, for onnxruntime, of the
artifact parameter-table sum in `kiln bench`.

Every initializer is read whole per token, except a table that only Gathers read (an embedding
or a position table), of which one row is read. A table also read by a MatMul (a tied LM head,
through a Transpose) counts whole.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError

#: ONNX data types packed two to a byte (UINT4, INT4, FLOAT4E2M1)
_NIBBLES = {21, 22, 23}
_GATHERS = {"Gather", "GatherBlockQuantized"}


def tensor_bytes(t) -> int:
    """Bytes of an initializer (a TensorProto), from its dims and type; data is not read."""
    from onnx import helper

    n = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in _NIBBLES:
        return (n + 1) // 2
    return n * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def bytes_per_token(model: Path) -> int:
    """Initializer bytes read to decode one token with the ONNX model at `model`."""
    import onnx

    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise KilnError(f"{model}: cannot read the ONNX model ({type(e).__name__})") from e
    readers: dict[str, set[str]] = {}
    for n in proto.graph.node:
        for i, name in enumerate(n.input):
            readers.setdefault(name, set()).add(n.op_type if i == 0 or n.op_type not in _GATHERS
                                                else "index")
    total = 0
    for t in proto.graph.initializer:
        size = tensor_bytes(t)
        ops = readers.get(t.name, set())
        if ops and ops <= _GATHERS and len(t.dims) >= 2 and t.dims[0]:
            size //= int(t.dims[0])  # one row per token
        total += size
    return total
