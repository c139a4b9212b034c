"""Programmatic dependent launch in the CUDA decode kernels (kiln.codegen.cuda.kernels.pdl), on a
machine without a GPU: which kernels carry the launch tag, where the wait sits, and that the
kernels that wait never read through `__restrict__` pointers (nvcc would load activations
through the non-coherent cache, which PDL makes unsafe). Their results on the GPU are in
benchmarks/RESULTS.md (run 11-13 of benchmarks/gpu/cuda_llm_log.md)."""

from __future__ import annotations

import re

import pytest

from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm, needs_cuda_toolchain]


def _cuda_source(func) -> str:
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with ct.cuda_compile_env(target):
        lib = tvm.tirx.build(mod, target, pipeline=pdl.PIPELINE)
    return lib.imports[0].inspect_source()


def _kernel_body(src: str) -> str:
    start = src.index('extern "C" __global__')
    return src[src.index("{", src.index(")", start)):]


@pytest.mark.parametrize("residual", [False, True])
def test_gemv_loads_weights_then_waits_then_reads_activations(residual):
    from kiln.codegen.cuda.kernels.gemv import gemv_kernel

    body = _kernel_body(_cuda_source(gemv_kernel(64, 512, "float16", "float16",
                                                 residual=residual, pdl=True)))
    wait = body.index("griddepcontrol_wait()")
    trigger = body.index("griddepcontrol_launch_dependents()")
    assert body.index("w_ptr") < wait < trigger < body.index("x_ptr")
    assert "__restrict__" not in _cuda_source(gemv_kernel(64, 512, "float16", "float16",
                                                           residual=residual, pdl=True))


def test_without_pdl_kernels_keep_restrict_and_never_wait():
    from kiln.codegen.cuda.kernels.gemv import gemv_kernel

    src = _cuda_source(gemv_kernel(64, 512, "float16", "float16", pdl=False))
    assert "__restrict__" in src and "griddepcontrol_wait()" not in _kernel_body(src)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_warp_decode_attention_builds_for_head_dim_64(dtype):
    from kiln.codegen.cuda.kernels.attention import decode_attention_kernel

    body = _kernel_body(_cuda_source(decode_attention_kernel(8, 2, 64, 0.125, dtype, pdl=True)))
    assert "__shfl_xor_sync" in body
    assert body.index("griddepcontrol_wait()") < body.index("q_ptr")


def test_decode_kernels_of_an_sm90_artifact_carry_the_launch_tag(tiny_model, tmp_path):
    """The launch tag goes to every kernel that waits (the decode GEMVs, the fused rotary,
    attention and argmax) and to no other; an sm_80 build has neither the tag nor the wait."""
    from kiln.codegen.cuda.kernels import pdl
    from kiln.compiler.compile import compile_model

    tag = pdl.TAG.encode()
    for arch, tagged in (("sm_90", True), ("sm_80", False)):
        art = compile_model(tiny_model, tmp_path / arch, target=f"cuda:{arch}", max_seq=64,
                            weights=False, dtype="float16")
        lib = (art / "kernels.so").read_bytes()
        assert (tag in lib) is tagged
        names = [n.decode() for n in _kernels_tagged(lib, tag)]
        if tagged:
            for kind in ("cuda_norm_gemv", "cuda_swiglu_gemv", "cuda_gemv",
                         "cuda_qkv_rotary_append", "cuda_decode_attention", "cuda_argmax"):
                assert any(n.startswith(kind) for n in names), kind
            assert not any(n.startswith(("cuda_flash", "fused_nt_matmul", "take"))
                           for n in names)


def _kernels_tagged(lib: bytes, tag: bytes) -> list[bytes]:
    """Names of the kernels whose launch-parameter list in the CUDA module holds `tag` (the
    serialized function table: a kernel's name, then its launch tags)."""
    import re

    names = []
    for m in re.finditer(re.escape(tag), lib):
        before = lib[max(0, m.start() - 400):m.start()]
        found = re.findall(rb"([A-Za-z_][A-Za-z0-9_]*_kernel)", before)
        if found:
            names.append(found[-1])
    return names


def test_split_decode_attention_is_two_kernels_that_both_wait():
    """Split-KV: the splits' kernel, then the merge, which reads what the first wrote, so
    under PDL it waits for it too."""
    from kiln.codegen.cuda.kernels.attention import decode_attention_kernel

    def kernels(src: str) -> dict[str, str]:  # name -> body (declarations left out)
        parts = re.split(r'extern "C" __global__ void __launch_bounds__\(\d+\) (\w+)', src)
        return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True)
                if "{" in body.split(";")[0]}

    split = kernels(_cuda_source(decode_attention_kernel(8, 2, 64, 0.125, "float16", pdl=True,
                                                         splits=4)))
    assert len(split) == 2
    assert all("griddepcontrol_wait()" in body for body in split.values())
    one = _cuda_source(decode_attention_kernel(8, 2, 64, 0.125, "float16", pdl=True))
    assert len(kernels(one)) == 1
