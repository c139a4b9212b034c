"""The CUDA target end to end on a machine without a GPU: a llama-tiny artifact compiled for sm_90
carries machine code (fatbin, no CUDA source), stores parameters and KV cache in the compute
dtype, and its decode step is rewritten into captured CUDA graphs with `past` kept off the
captured launches. Where a GPU exists, the artifact also runs (tests/runtime/test_cuda_session)."""

from __future__ import annotations

import json

import pytest

from kiln.compiler.errors import KilnError
from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm, needs_cuda_toolchain]


@pytest.fixture(scope="module")
def cuda_artifact(tiny_model, tmp_path_factory):
    from kiln.compiler.compile import compile_model

    out = tmp_path_factory.mktemp("cuda") / "art"
    return compile_model(tiny_model, out, target="cuda:sm_90", max_seq=64, weights=False,
                         dtype="float16")


def test_kernels_are_sm90_machine_code_not_source(cuda_artifact):
    from kiln.codegen import cuda_toolchain as ct

    lib = cuda_artifact / "kernels.so"
    ct.require_fatbin(lib, "sm_90")
    assert ("cubin", "sm_90") in ct.fatbin_entries(lib)
    assert ct.CUDA_SOURCE_MARK not in lib.read_bytes()


def test_manifest_records_dtype_and_stores_params_and_cache_in_it(cuda_artifact):
    m = json.loads((cuda_artifact / "manifest.json").read_text())
    assert m["target"]["kind"] == "cuda" and m["target"]["arch"] == "sm_90"
    assert m["target"]["dtype"] == "float16" and m["target"]["max_batch"] >= 1
    # the entry points take past and an offset per row (batches of unequal lengths)
    assert m["target"]["row_offsets"] == m["target"]["max_batch"] == 16
    floats = [p for p in m["params"] if p["dtype"].startswith(("float", "bfloat"))]
    assert floats and all(p["dtype"] == "float16" for p in floats)
    assert all(c["dtype"] == "float16" for c in m["signature"]["caches"])
    assert {o["dtype"] for o in m["signature"]["outputs"]} == {"float32"}  # logits stay fp32
    assert set(m["entry_points"]) == {"prefill", "decode", "prefill_last"}
    # no attention mask, no position ids (past, past + 1, ... computed on the device)
    assert [i["name"] for i in m["signature"]["inputs"]] == ["input_ids"]


def test_decode_is_captured_as_cuda_graphs(tiny_model):
    """After RewriteCUDAGraph, decode replays captured graphs; kernels needing `past` as a
    scalar (it changes every step) stay outside them: the captures are keyed on batch and
    capacity only, so one capture serves every decode step."""
    from tvm.relax.backend.cuda import pipeline as P

    from kiln.codegen.build import build_module
    from kiln.codegen.cuda import backend
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph

    graph = compile_graph(tiny_model, max_seq=64, progress=lambda m: None,
                          weights_optional=True)
    tgt = CudaTarget(dtype="float16")
    mod, _ = build_module(graph, tgt, entry_points=("decode",))
    t = tgt.tvm_target()
    with tvm.transform.PassContext(opt_level=3, config={backend.USE_CUDA_GRAPH: True}), t:
        passes = (P.library_dispatch_passes(t) + P.legalize_passes(t)
                  + P.dataflow_lower_passes(t) + P.finalize_passes(t)[:2])
        mod = tvm.transform.Sequential(passes)(mod)
    text = mod["decode"].script()
    assert text.count("vm.builtin.cuda_graph.run_or_capture") >= 1
    captures = [gv.name_hint for gv in mod.functions if "cuda_graph_capture" in gv.name_hint]
    assert captures
    for name in captures:
        body = mod[name].script()
        assert "kv_past" not in body and "past" not in str(mod[name].params[-1].ty)
        # each row's length (past + its offset: scalars of the call) is written outside too
        assert "cuda_row_lengths" not in body and "row_offset" not in body
    assert "cuda_row_lengths" in text
    # the layers in one graph; the position ids (computed from the device copy of past) in a
    # small one of their own: the token embedding, reading the call's input ids, sits between
    bodies = [mod[name].script() for name in captures]
    assert sum("cuda_decode_attention" in b for b in bodies) == 1
    assert any("positions" in b for b in bodies)


def test_unknown_dtype_and_cpu_half_are_refused(tiny_model, tmp_path):
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_model

    with pytest.raises(KilnError, match="dtype"):
        CudaTarget(dtype="int8")
    with pytest.raises(KilnError, match="float32 only"):
        compile_model(tiny_model, tmp_path / "x", target="cpu", weights=False,
                      dtype="float16")


def test_int8_kv_cache_is_refused_on_cuda(tiny_model, tmp_path):
    from kiln.compiler.compile import compile_model

    with pytest.raises(KilnError, match="--quant kv8: the int8 KV cache"):
        compile_model(tiny_model, tmp_path / "q", target="cuda", weights=False, quant="kv8")
    assert not (tmp_path / "q").exists()


def test_decode_fuses_qkv_rotary_and_append_into_the_gemv(tiny_model):
    """Decode's q/k/v projection, rotary and KV append are one kernel (the prefill keeps the
    GEMM + rotary/append kernel); --no-fuse qkv_projection restores the separate kernel."""
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph
    from kiln.passes.fusion import enabled

    for fused in (True, False):
        graph = compile_graph(tiny_model, max_seq=64, progress=lambda m: None,
                              weights_optional=True,
                              fusions=enabled([] if fused else ["qkv_projection"]))
        mod, _ = build_module(graph, CudaTarget(dtype="float16"),
                              entry_points=("decode", "prefill"))
        decode, prefill = mod["decode"].script(), mod["prefill"].script()
        assert ("cuda_qkv_rope_gemv" in decode) is fused
        assert ("cuda_qkv_rotary_append" in decode) is not fused
        assert "cuda_qkv_rotary_append" in prefill and "cuda_qkv_rope_gemv" not in prefill
