"""The torch reference of the GPU checks (benchmarks/gpu/torch_ref.py) against kiln's numpy
interpreter, op by op on seeded random inputs, and whole zoo graphs against the CPU artifact."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.interpreter import KERNELS
from kiln.compiler.ir import Attrs
from tests.helpers import assert_close

torch = pytest.importorskip("torch")
REF = Path(__file__).parent.parent / "benchmarks" / "gpu" / "torch_ref.py"
ZOO = Path(__file__).parent / "data" / "zoo"


@pytest.fixture(scope="module")
def ref():
    spec = importlib.util.spec_from_file_location("torch_ref", REF)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


#: op, attrs, inputs (seeded generator -> list of arrays, None for an omitted input)
CASES = {
    "layer_norm": ("layer_norm", {"eps": 1e-5}, lambda r: [_f(r, 2, 5, 16), _f(r, 16),
                                                           _f(r, 16)]),
    "layer_norm_no_bias": ("layer_norm", {"eps": 1e-5}, lambda r: [_f(r, 3, 16), _f(r, 16)]),
    "rms_norm_per_head": ("rms_norm", {"eps": 1e-6, "group_size": 8},
                          lambda r: [_f(r, 1, 3, 32), _f(r, 8)]),
    "gelu": ("gelu", {"approximate": "none"}, lambda r: [_f(r, 4, 33)]),
    "gelu_tanh": ("gelu", {"approximate": "tanh"}, lambda r: [_f(r, 4, 33)]),
    "gelu_mul": ("gelu_mul", {"approximate": "tanh"}, lambda r: [_f(r, 4, 9), _f(r, 4, 9)]),
    "silu": ("silu", {}, lambda r: [_f(r, 4, 9)]),
    "silu_mul": ("silu_mul", {}, lambda r: [_f(r, 4, 9), _f(r, 4, 9)]),
    "rotary_partial": ("rotary", {"num_heads": 2, "head_dim": 8, "interleaved": False},
                       lambda r: [_f(r, 1, 5, 16), _f(r, 1, 5, 4), _f(r, 1, 5, 4)]),
    "rotary_interleaved": ("rotary", {"num_heads": 2, "head_dim": 8, "interleaved": True},
                           lambda r: [_f(r, 1, 5, 16), _f(r, 1, 5, 4), _f(r, 1, 5, 4)]),
    "Softmax": ("Softmax", {"axis": -1}, lambda r: [_f(r, 3, 7)]),
    "MatMul": ("MatMul", {}, lambda r: [_f(r, 2, 3, 4), _f(r, 4, 5)]),
    "Where": ("Where", {}, lambda r: [r.random((3, 4)) > 0.5, _f(r, 3, 4), _f(r, 1, 4)]),
    "Tanh": ("Tanh", {}, lambda r: [_f(r, 3, 4)]),
    "Relu": ("Relu", {}, lambda r: [_f(r, 3, 4)]),
    "Erf": ("Erf", {}, lambda r: [_f(r, 3, 4)]),
    "Div": ("Div", {}, lambda r: [_f(r, 3, 4), np.float32(3.5)]),
    "Pow": ("Pow", {}, lambda r: [np.abs(_f(r, 3, 4)), np.float32(1.5)]),
    "Concat": ("Concat", {"axis": 1}, lambda r: [_f(r, 2, 3), _f(r, 2, 2)]),
    "Slice": ("Slice", {}, lambda r: [_f(r, 4, 6), np.array([1]), np.array([5]), np.array([1]),
                                      None]),
    "CumSum": ("CumSum", {}, lambda r: [_f(r, 3, 5), np.array(1)]),
    "Cast": ("Cast", {"to": "int64"}, lambda r: [_f(r, 3, 4) * 5]),
}


def _run_ref(ref, op, attrs, arrays, symbols=None):
    x = [None if a is None else torch.from_numpy(np.asarray(a).astype(np.float64)
                                                 if np.asarray(a).dtype.kind == "f"
                                                 else np.asarray(a)) for a in arrays]
    node = {"op": op, "attrs": attrs, "inputs": [], "outputs": ["y"]}
    return ref.run_node(node, x, symbols or {})[0].numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_the_interpreter(ref, case, rng):
    op, attrs, make = CASES[case]
    arrays = make(rng)
    if op == "Cast":
        from kiln.compiler.ir import DType

        want = KERNELS[op](arrays, Attrs({"to": DType("int64")}))[0]
    else:
        want = KERNELS[op](arrays, Attrs(attrs))[0]
    got = _run_ref(ref, op, attrs, arrays)
    assert got.shape == want.shape
    assert_close(got, want.astype(got.dtype), rtol=2e-5, atol=2e-5, name=case)


@pytest.mark.parametrize(("window", "kv_bits"), [(0, 0), (3, 0), (0, 8)])
def test_attention_matches_the_interpreter(ref, rng, window, kv_bits):
    """GQA (4 query heads over 2), a scale, causal, with and without a sliding window, and
    with the int8 KV cache's rows (kv8: what the CUDA artifacts are checked against)."""
    attrs = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "scale": 0.3, "causal": True,
             **({"window": window} if window else {}), **({"kv_bits": 8} if kv_bits else {})}
    q, k, v = _f(rng, 1, 7, 32), _f(rng, 1, 7, 16), _f(rng, 1, 7, 16)
    want = KERNELS["attention"]([q, k, v], Attrs(attrs))[0]
    if kv_bits:  # the round trip changes the answer: the reference must apply it too
        plain = KERNELS["attention"]([q, k, v], Attrs({**attrs, "kv_bits": 0}))[0]
        assert np.abs(want - plain).max() > 1e-4
    assert_close(_run_ref(ref, "attention", attrs, [q, k, v]), want, rtol=2e-5, atol=2e-5,
                 name=f"attention window {window} kv_bits {kv_bits}")


def test_symbolic_dims_and_range(ref):
    got = _run_ref(ref, "Range", {"start": "past", "limit": "past + seq", "delta": 1,
                                  "dtype": "int64"}, [], {"batch": 1, "seq": 5, "past": 2})
    assert got.tolist() == [2, 3, 4, 5, 6]
    node = {"op": "Reshape", "attrs": {}, "shape": ["batch*seq", "4"]}
    x = torch.zeros(1, 3, 4, dtype=torch.float64)
    assert ref.run_node(node, [x], {"batch": 1, "seq": 3, "past": 0})[0].shape == (3, 4)
    assert ref.dim("batch*seq + past", {"batch": 2, "seq": 3, "past": 4}) == 10
    assert math.isclose(ref.gelu(torch.tensor(1.0, dtype=torch.float64), "none").item(),
                        0.8413447460685429)


@pytest.mark.tvm
def test_zoo_graph_matches_the_cpu_artifact(ref, tmp_path, rng):
    """A whole canonical graph (gemma2: sliding window, softcapped logits, Range, GeGLU, per-layer
    sandwich norms) as the GPU check serializes it, against kiln's CPU artifact (every zoo
    export: benchmarks/gpu/zoo_cuda.py build --target cpu, then check)."""
    name = "gemma2"
    pytest.importorskip("tvm")
    from kiln.compiler.compile import compile_graph, compile_model
    from kiln.runtime.session import Session

    model = ZOO / f"{name}-optimum.onnx"
    graph = compile_graph(model, max_seq=64, progress=lambda m: None, weights_optional=False)
    gj = json.loads(json.dumps(ref.graph_json(graph)))
    params = ref.as_float64({k: p.load() for k, p in graph.params.items()}, "cpu")
    session = Session.load(compile_model(model, tmp_path / name, max_seq=64))
    ids = rng.integers(0, 128, 21)
    want = ref.forward(gj, params, ids, "cpu").numpy()
    got = session.prefill(ids[None])[0]
    assert_close(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()), name=name)
