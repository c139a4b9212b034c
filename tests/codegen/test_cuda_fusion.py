"""The CUDA lowering consumes the recorded fusion groups: with each fusion off, its fused
kernels are gone and the ops it grouped lower unfused; with every fusion off the module still
cross-compiles to sm_90 machine code (no GPU needed)."""

from __future__ import annotations

import pytest

from kiln.compiler.fusions import FUSIONS
from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

#: fused kernels (prefixes of kernel names) that a fusion, or one it builds on, brings
FUSED = {
    "norm_linear": ("cuda_norm_gemv", "cuda_qkv_rope_gemv", "cuda_swiglu_gemv"),
    # o_proj, down_proj with the Add: the GEMV's `residual` flag in its name
    "residual_add": ("cuda_gemv_64_128_float16_float16_True",
                     "cuda_gemv_64_64_float16_float16_True"),
    "qkv_rope": ("cuda_qkv_rotary_append", "cuda_qkv_rope_gemv"),
    "qkv_projection": ("cuda_qkv_rope_gemv",),
    "swiglu": ("cuda_swiglu_gemv", "cuda_swiglu_"),
    "projections": ("cuda_qkv_rotary_append", "cuda_qkv_rope_gemv", "cuda_swiglu"),
}
#: what an op grouped by the fusion lowers to once it is off (unfused)
UNFUSED = {
    "norm_linear": "rms_norm",
    "residual_add": "cuda_gemv_64_64_float16_float16_False",
    "qkv_rope": "cuda_kv_append",
    "qkv_projection": "cuda_qkv_rotary_append",
    "swiglu": "silu_mul",
    "projections": "cuda_kv_append",
    "all": "cuda_kv_append",
}


def _kernels(tiny_model, no_fuse: list[str]) -> set[str]:
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph
    from kiln.passes.fusion import enabled

    tgt = CudaTarget(dtype="float16")
    graph = compile_graph(tiny_model, max_seq=64, progress=lambda m: None,
                          weights_optional=True, fusions=enabled(no_fuse, take=tgt.fusions))
    mod, _ = build_module(graph, tgt)
    return {gv.name_hint for gv in mod.functions}


@pytest.fixture(scope="module")
def fused(tiny_model) -> set[str]:
    return _kernels(tiny_model, [])


def test_all_fusions_bring_their_kernels(fused):
    for name, kernels in FUSED.items():
        assert any(k.startswith(kernels[0]) for k in fused), name


@pytest.mark.parametrize("name", [*FUSIONS, "all"])
def test_each_fusion_off_lowers_its_ops_unfused(tiny_model, fused, name):
    kernels = _kernels(tiny_model, [name])
    for f in (f for f in FUSED if name in (f, "all")):
        gone = [k for k in kernels if k.startswith(FUSED[f])]
        assert not gone, (f, gone)
    assert any(k.startswith(UNFUSED[name]) for k in kernels), sorted(kernels)
    assert kernels != fused


@needs_cuda_toolchain
def test_every_fusion_off_cross_compiles_to_sm90(tiny_model, tmp_path):
    from kiln.codegen import cuda_toolchain as ct
    from kiln.compiler.compile import compile_model

    art = compile_model(tiny_model, tmp_path / "art", target="cuda:sm_90", max_seq=64,
                        weights=False, dtype="float16", no_fuse=("all",))
    ct.require_fatbin(art / "kernels.so", "sm_90")
    import json

    assert json.loads((art / "manifest.json").read_text())["fusions"] == []
