"""The CUDA lowerings outside the fused fast paths (kiln.codegen.cuda.lower_generic and the
sliding-window attention kernel), on a machine without a GPU: every zoo export that compiles for
the CPU lowers for CUDA (three of them here), and two of them compile to sm_90 machine code
(logits float32 after gemma2's softcap too). Their numbers are checked on the GPU host against
torch (benchmarks/gpu/zoo_cuda.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.compiler.errors import KilnError
from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm]

ZOO = Path(__file__).parent.parent / "data" / "zoo"
#: the zoo exports that compile for the CPU (tests/runtime/test_runtime.py), and the ops of
#: their canonical graphs the Llama-like fast paths do not cover
CPU_COMPILES = {
    "falcon": {"layer_norm", "gelu"}, "gpt_neox": {"layer_norm", "gelu"},
    "gptj": {"layer_norm", "gelu", "Cast"}, "mistral": set(), "phi": {"layer_norm", "gelu"},
    "phi3": set(), "qwen3": set(), "gemma": {"Range", "Reshape", "gelu_mul"},
    "opt": {"layer_norm", "Relu", "Reshape"},
    "gemma2": {"Range", "Reshape", "gelu_mul", "Div", "Tanh"},
}


def _module(name: str, max_seq: int = 64, dtype: str = "float16"):
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import _without_idle_windows, compile_graph

    graph = compile_graph(ZOO / f"{name}-optimum.onnx", max_seq=max_seq,
                          progress=lambda m: None, weights_optional=True)
    graph = _without_idle_windows(graph, max_seq)
    ops = {n.op for n in graph.nodes}
    mod, _ = build_module(graph, CudaTarget(dtype=dtype))
    return mod, ops


@pytest.mark.parametrize("name", ["mistral", "opt", "gemma"])
def test_zoo_exports_lower_for_cuda(name):
    """Three of CPU_COMPILES (the GPU check builds them all): Mistral's window as long as the
    context dropped, opt's LayerNorm / ReLU / Reshape, gemma's Range and GeGLU."""
    mod, ops = _module(name)
    assert CPU_COMPILES[name] <= ops
    kernels = {gv.name_hint for gv in mod.functions}
    # only gemma2's 4-token window is shorter than the context: Mistral's 4096 is dropped
    # and takes the kernels of full causal attention
    assert not any("cuda_window_attention" in k for k in kernels)
    assert any("cuda_decode_attention" in k for k in kernels)


@needs_cuda_toolchain
@pytest.mark.parametrize("name, dtype", [("gemma2", "float16"), ("gptj", "float32")])
def test_compiles_to_sm90_machine_code(name, dtype, tmp_path):
    """gemma2 (fp16): Range, GeGLU, softcapped logits, a window of 4 < --max-seq; gptj (fp32):
    LayerNorm, GELU-tanh, Cast, interleaved partial rotary."""
    from kiln.codegen import cuda_toolchain as ct
    from kiln.compiler.compile import compile_model

    art = compile_model(ZOO / f"{name}-optimum.onnx", tmp_path / name, target="cuda:sm_90",
                        max_seq=64, weights=False, dtype=dtype)
    ct.require_fatbin(art / "kernels.so", "sm_90")
    if name == "gemma2":  # its 4-token window (the global layer: full attention)
        assert b"cuda_window_attention" in (art / "kernels.so").read_bytes()
    m = json.loads((art / "manifest.json").read_text())
    assert {o["dtype"] for o in m["signature"]["outputs"]} == {"float32"}


def test_an_op_without_a_cuda_lowering_is_one_line():
    from types import SimpleNamespace

    from kiln.codegen.cuda.lower import lower_node
    from kiln.compiler.ir import Node

    ctx = SimpleNamespace(target=SimpleNamespace(name="cuda"), values={})
    with pytest.raises(KilnError, match=r"^no lowering for op NoSuchOp \(node n0\) on target "
                                        r"cuda$"):
        lower_node(ctx, Node("NoSuchOp", ("x",), ("y",), name="n0"))


def test_cumsum_exclusive_is_refused_naming_cuda(monkeypatch):
    from types import SimpleNamespace

    from kiln.codegen.cuda.lower_generic import _cumsum
    from kiln.compiler.ir import Node

    ctx = SimpleNamespace(target=SimpleNamespace(name="cuda"), values={"x": None},
                          graph=SimpleNamespace(params={}), input=lambda n, i: None)
    with pytest.raises(KilnError, match="exclusive/reverse have no CUDA lowering"):
        _cumsum(ctx, Node("CumSum", ("x",), ("y",), {"axis": 0, "exclusive": 1}, name="c"))
