"""onnxruntime's own weight-only quantization of an ONNX decoder (MatMul -> MatMulNBits): the int4
peer that kiln's quantized artifacts are measured against.

onnxruntime's quantizer rewrites a MatMul only when its weight is an initializer. A tied LM head
reads the embedding table through a Transpose node, so it stays float unless `tied_head` first
stores the transposed table as an initializer of its own (the Gather keeps the float table).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.frontend.onnx_traffic import tensor_bytes

#: above this the model must keep its weights in an external data file (protobuf's 2 GB limit)
_EXTERNAL_BYTES = 1 << 30


@dataclass
class QuantizeReport:
    path: Path
    quantized: int  # MatMul nodes rewritten to MatMulNBits
    left_float: list[str] = field(default_factory=list)  # MatMul/Gemm on weights left float
    tied_head: str | None = None  # the LM head MatMul reading the (transposed) embedding table
    tied_head_quantized: bool = False
    bytes_before: int = 0  # initializer bytes
    bytes_after: int = 0


def quantize_onnx(model: Path, out: Path, *, bits: int = 4, block_size: int = 32,
                  accuracy_level: int | None = 4, symmetric: bool = True,
                  tied_head: bool = False) -> QuantizeReport:
    """Write `out`, `model` with every MatMul on a constant weight quantized blockwise to `bits`
    (onnxruntime's MatMulNBitsQuantizer, round to nearest)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if bits not in (2, 4, 8):
        raise KilnError(f"--bits {bits}: onnxruntime's MatMulNBits takes 2, 4 or 8")
    if block_size < 16 or block_size & (block_size - 1):
        raise KilnError(f"--block-size {block_size}: must be a power of two >= 16")
    if not model.is_file():
        raise KilnError(f"{model}: no such ONNX file")
    try:
        proto = onnx.load(str(model))
    except Exception as e:  # onnx raises DecodeError, OSError, ...
        raise KilnError(f"{model}: cannot read the ONNX model ({type(e).__name__})") from e
    before = _initializer_bytes(proto)
    head = _tied_head(proto)
    if tied_head and head is not None:
        _materialize_transpose(proto, head)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, accuracy_level=accuracy_level)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer.process()
    result = quantizer.model.model
    out.parent.mkdir(parents=True, exist_ok=True)
    after = _initializer_bytes(result)
    data = out.with_name(out.name + ".data")
    if data.exists():
        data.unlink()
    onnx.save_model(result, str(out), save_as_external_data=after > _EXTERNAL_BYTES,
                    all_tensors_to_one_file=True, location=data.name)
    left = [n.name for n in result.graph.node if n.op_type in ("MatMul", "Gemm") and
            _is_weight(result, n.input[1])]
    ops = Counter(n.op_type for n in result.graph.node)
    head_name = head[0].name if head else None
    return QuantizeReport(out, ops["MatMulNBits"], left, head_name,
                          head is not None and all(n.name != head_name for n in result.graph.node
                                                   if n.op_type == "MatMul"),
                          before, after)


def _initializer_bytes(proto) -> int:
    return sum(tensor_bytes(t) for t in proto.graph.initializer)


def _is_weight(proto, name: str) -> bool:
    return any(t.name == name for t in proto.graph.initializer)


def _tied_head(proto):
    """(MatMul, Transpose) when a MatMul reads a transposed initializer that a Gather also reads
    (an LM head tied to the embedding table), else None."""
    inits = {t.name for t in proto.graph.initializer}
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    transposes = {n.output[0]: n for n in proto.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits & gathered}
    for n in proto.graph.node:
        if n.op_type == "MatMul" and n.input[1] in transposes:
            return n, transposes[n.input[1]]
    return None


def _materialize_transpose(proto, head) -> None:
    """Store Transpose(table) as an initializer and point the head's MatMul at it."""
    from onnx import numpy_helper

    matmul, transpose = head
    table = next(t for t in proto.graph.initializer if t.name == transpose.input[0])
    perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    name = f"{table.name}.T"
    array = np.ascontiguousarray(np.transpose(numpy_helper.to_array(table), perm))
    proto.graph.initializer.append(numpy_helper.from_array(array, name))
    matmul.input[1] = name
    if not any(transpose.output[0] in n.input for n in proto.graph.node):
        proto.graph.node.remove(transpose)
