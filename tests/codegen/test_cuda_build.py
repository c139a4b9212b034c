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


@pytest.mark.parametrize("quant", ["kv8", "w4g32-kv8"])
def test_int8_kv_cache_compiles_for_cuda(tiny_model, tmp_path, quant):
    """--quant kv8 on CUDA: each layer's K and V cache int8, a float32 scale cache beside each
    (kept float32 in an fp16 artifact), machine code for sm_90."""
    from kiln.codegen import cuda_toolchain as ct
    from kiln.compiler.compile import compile_model

    art = compile_model(tiny_model, tmp_path / "q", target="cuda:sm_90", max_seq=64,
                        weights=False, dtype="float16", quant=quant)
    ct.require_fatbin(art / "kernels.so", "sm_90")
    m = json.loads((art / "manifest.json").read_text())
    caches = m["signature"]["caches"]
    codes = [c for c in caches if c["dtype"] == "int8"]
    assert len(codes) == 4 and all(c["head_dim"] == 16 for c in codes)  # 2 layers, K and V
    assert [c for c in caches if c not in codes] == [
        {**c, "name": f"{c['name']}:scale", "head_dim": 1, "dtype": "float32"} for c in codes]
    floats = [p for p in m["params"] if p["dtype"].startswith("float")]
    assert floats and all(p["dtype"] == "float16" for p in floats)


@pytest.mark.parametrize("head_dim", [16, 32])
def test_int8_kv_cache_takes_the_quantizing_append_unfused(tmp_path, head_dim):
    """kv8 attention: the rotary runs as its own kernel and the append is the quantizing one
    (no fused q/k/v + rotary + append, in decode or prefill), decode reads int8 caches (head
    dim 16: the thread kernel, 32: the warp kernel), prefill takes the plain tiled kernel (the
    tensor-core flash kernel has no int8 caches); all four caches updated in place."""
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph
    from kiln.models.synthetic import CONFIGS, write_synthetic
    from kiln.passes.quantize import parse_preset

    cfg = CONFIGS["llama-tiny"].replace(heads=64 // head_dim, kv_heads=32 // head_dim,
                                        head_dim=head_dim)
    model = write_synthetic(cfg, tmp_path, weights=False)
    graph = compile_graph(model, max_seq=64, progress=lambda m: None, weights_optional=True,
                          quant=parse_preset("kv8"))
    mod, sig = build_module(graph, CudaTarget(dtype="float16"),
                            entry_points=("decode", "prefill"))
    assert [c.dtype for c in sig.caches] == ["int8", "float32"] * 4
    decode, prefill = mod["decode"].script(), mod["prefill"].script()
    for text in (decode, prefill):
        assert text.count("R.call_tir_inplace(cuda_kv_append_q8") == 2
        assert "qkv_rope_gemv" not in text and "qkv_rotary_append" not in text
        assert "rotary" in text
    assert decode.count("cuda_decode_attention") == 2 and "_kv8" in decode
    assert "cuda_flash_prefill" not in prefill and "cuda_prefill_attention" in prefill
    # the appends' four in-place outputs (codes and scales of K and V)
    kernel = next(gv for gv in mod.get_global_vars() if gv.name_hint.startswith(
        "cuda_kv_append_q8"))
    assert len(mod[kernel].params) == 7


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
