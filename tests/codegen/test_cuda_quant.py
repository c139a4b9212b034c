"""Weight-only quantized presets on the CUDA target, on a machine without a GPU: the artifact
carries sm_90 machine code (no CUDA source), keeps the weights quantized (`nk` layout, scales in
the compute dtype), decodes through the quantized GEMV kernels and prefills through the
tensor-core attention; the kernels' generated CUDA has the instructions meant."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm, needs_cuda_toolchain]


@pytest.fixture(scope="module", params=["w4g32", "w8", "w4g64s-pure"])
def quant_artifact(request, tiny_model, tmp_path_factory):
    from kiln.compiler.compile import compile_model

    out = tmp_path_factory.mktemp("cudaq") / f"art-{request.param}"
    return request.param, compile_model(tiny_model, out, target="cuda:sm_90", max_seq=64,
                                        weights=False, dtype="float16", quant=request.param)


def test_quantized_kernels_are_sm90_machine_code(quant_artifact):
    from kiln.codegen import cuda_toolchain as ct

    _, art = quant_artifact
    lib = art / "kernels.so"
    ct.require_fatbin(lib, "sm_90")
    data = lib.read_bytes()
    assert ct.CUDA_SOURCE_MARK not in data
    assert b"cuda_qgemv_" in data  # the decode GEMV
    # the prefill GEMM with the dequantize fused in (no separate dequantize kernel)
    assert b"fused_quant_nt_matmul" in data and b"dequantize" not in data
    assert b"cuda_flash_prefill_" in data


def test_manifest_keeps_weights_quantized_in_nk_layout(quant_artifact):
    preset, art = quant_artifact
    m = json.loads((art / "manifest.json").read_text())
    assert m["quant"]["preset"] == preset
    params = {p["name"]: p for p in m["params"]}
    q = [p for p in m["params"] if p["role"].endswith(".qweight")]
    assert q and not [p for p in m["params"] if p["role"] == "linear.weight"]
    kinds = set()
    for p in q:  # [N, Kp / 2] packed nibbles or [N, Kp] int8; G groups of g (or one per row)
        a = p["derivation"]["attrs"]
        base = p["name"][: -len(".qweight")]
        bits, g = a["bits"], a["group"]
        assert p["dtype"] == ("uint8" if bits == 4 else "int8")
        kp = p["shape"][1] * (2 if bits == 4 else 1)
        sc = params[base + ".scales"]
        assert sc["dtype"] == "float16" and sc["shape"] == [p["shape"][0], kp // g if g else 1]
        assert (base + ".zero_points" in params) == (not a["symmetric"])
        kinds.add((bits, g, a["symmetric"]))
    want = {"w8": {(8, 0, True)}, "w4g64s-pure": {(4, 64, True)},
            # the default int4 preset: zero points, and int8 rows for the LM head and q/k/v
            "w4g32": {(4, 32, False), (8, 0, True)}}[preset]
    assert kinds == want


@pytest.mark.parametrize("bits,group,zp,res,eps", [
    (4, 32, False, True, None), (4, 64, True, False, 1e-5), (8, 128, False, False, 1e-5),
    (8, 256, True, True, None)])
def test_quant_gemv_variants_load_16_bytes_and_skip_conversions(bits, group, zp, res, eps):
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels.quant_gemv import quant_gemv_kernel

    f = quant_gemv_kernel(96, 256, bits, group, "float16", "float16", zero_points=zp,
                          residual=res, norm_eps=eps, math="f32")
    src = _cuda_source(ct, f.with_attr("global_symbol", "qgemv"))
    assert re.search(r"\bu?int4 v_ = \*\(u?int4\*\)\(qw_ptr", src)  # 16-byte weight loads
    assert "1258291200" in src  # codes turned into floats through the 2^23 mantissa trick


@pytest.mark.parametrize("bits,group,zp,eps", [(4, 32, False, None), (4, 64, True, 1e-5),
                                               (8, 128, False, 1e-5), (8, 256, True, None)])
def test_quant_gemv_f16x2_unpacks_two_codes_per_instruction(bits, group, zp, eps):
    """The fp16 default: codes into half2 mantissas (int4: lop3 with 1024.0's bits; int8: a
    byte permute), products and their partial sums as half2 fma, four per word (int4) or two
    words (int8) before the float32 sum."""
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import quant_gemv as qg

    assert qg.math_default(bits, "float16") == "f16x2"
    assert qg.math_default(bits, "bfloat16") == "f32"  # bf16's 7-bit mantissa: no room
    with pytest.raises(ValueError, match="f16x2"):
        qg.quant_gemv_kernel(96, 256, bits, group, "bfloat16", "bfloat16", math="f16x2")
    f = qg.quant_gemv_kernel(96, 256, bits, group, "float16", "float16", zero_points=zp,
                             norm_eps=eps)
    src = _cuda_source(ct, f.with_attr("global_symbol", "qgemv"))
    assert re.search(r"\bu?int4 v_ = \*\(u?int4\*\)\(qw_ptr", src)
    assert "1258291200" not in src
    words = 4 * qg.rows_default(96)  # 16 bytes per lane and row per step, one step (k = 256)
    if bits == 4:  # four lop3 per word, with 0x64006400 (half2 1024, 1024)
        assert src.count("lop3_b32") - 1 == 4 * words and "1677747200" in src
    else:
        assert src.count("__byte_perm") == 2 * words
    pairs = 4 if bits == 4 else 2  # half2 products per word
    assert src.count("fma_half_rn_f16x2") + src.count("mul_half_rn_f16x2") >= pairs * words


def test_quant_swiglu_gemv_pairs_gate_and_up_rows_in_a_warp():
    """swiglu=True: each warp loads its outputs' gate rows and their up rows F further (x
    loaded once for all four rows here), and writes silu(gate) * up for F outputs."""
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import quant_gemv as qg

    f, k = 128, 512  # int4: 256 bytes per weight row
    func = qg.quant_gemv_kernel(2 * f, k, 4, 32, "float16", "float16", zero_points=True,
                                norm_eps=1e-5, swiglu=True, rows=4)
    assert f'y: T.Buffer((m, {f}), "float16")' in func.script()
    src = _cuda_source(ct, func.with_attr("global_symbol", "qgemv"))
    loads = re.findall(r"\*\(uint4\*\)\(qw_ptr \+ \(.*?\) \+ (\d+)\)\);", src)
    assert sorted(int(v) for v in loads) == [256, f * 256, (f + 1) * 256]  # (row 0: no offset)
    assert src.count("expf(") == 2  # two outputs per warp
    with pytest.raises(ValueError, match="gate/up pairs"):
        qg.quant_gemv_kernel(2 * f, k, 4, 32, "float16", "float16", swiglu=True, rows=1)
    with pytest.raises(ValueError, match="residual"):
        qg.quant_gemv_kernel(2 * f, k, 4, 32, "float16", "float16", swiglu=True,
                             residual=True)


def _decode_calls(tiny_model, preset: str, no_fuse: tuple[str, ...] = ()) -> list[str]:
    """The kernels the decode entry of the tiny llama quantized with `preset` calls, in order."""
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph
    from kiln.passes.fusion import enabled
    from kiln.passes.quantize import parse_preset

    tgt = CudaTarget(arch="sm_90", dtype="float16")
    graph = compile_graph(tiny_model, max_seq=64, progress=lambda m: None,
                          weights_optional=True, quant=parse_preset(preset).for_target(
                              tgt.int8_dot), fusions=enabled(no_fuse, take=tgt.fusions))
    mod, _ = build_module(graph, tgt, entry_points=("decode",))
    return re.findall(r"R\.call_tir\((\w+),", mod["decode"].script())


@pytest.mark.parametrize("preset", ["w4g32", "w8"])
def test_decode_fuses_swiglu_into_the_quant_gemv(tiny_model, preset):
    """The gate/up projection's quantized GEMV writes silu(gate) * up itself, the rms_norm in
    front (its eps in the kernel's name) or, with norm_linear off, without it; with the swiglu
    fusion off, its [m, 2F] output goes through Split and silu_mul again: one kernel more per
    layer."""
    layers = 2
    fused = _decode_calls(tiny_model, preset)
    swiglu = [k for k in fused if k.startswith("cuda_qgemv_swiglu_")]
    assert len(swiglu) == layers and len(set(swiglu)) == 1 and "_None_" not in swiglu[0]
    assert not [k for k in fused if k.startswith(("cuda_swiglu_", "silu_mul"))]
    off = _decode_calls(tiny_model, preset, ("swiglu",))
    assert not [k for k in off if k.startswith("cuda_qgemv_swiglu_")]
    assert off.count("silu_mul") == layers and len(off) == len(fused) + layers
    unnormed = [k for k in _decode_calls(tiny_model, preset, ("norm_linear",))
                if k.startswith("cuda_qgemv_swiglu_")]
    assert len(unnormed) == layers and "_None_" in unnormed[0]


def test_flash_prefill_uses_tensor_core_mma():
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels.flash_attention import flash_prefill_kernel, supported

    assert supported(64, "float16") and supported(64, "bfloat16")
    assert not supported(64, "float32") and not supported(24, "float16")
    f = flash_prefill_kernel(8, 2, 64, 0.125, "bfloat16").with_attr("global_symbol", "fa")
    src = _cuda_source(ct, f)
    # per 64-key tile and warp: 8 n-tiles x 4 k-steps for S = QK^T, 8 x 4 for O += PV
    assert src.count("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == 64
    assert "__shfl_xor_sync" in src
    f = flash_prefill_kernel(8, 2, 64, 0.125, "float16", ldsm=True)
    src = _cuda_source(ct, f.with_attr("global_symbol", "fa"))
    assert src.count("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32") == 64
    assert src.count("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") == 16  # V: 4 x 4
    assert src.count("ldmatrix.sync.aligned.m8n8.x4.shared.b16") == 16  # K


def _cuda_source(ct, func) -> str:
    ct.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    with target, ct.cuda_compile_env(target):
        ex = tvm.compile(tvm.IRModule({"main": func}), target)
    mods = [ex.mod]
    while mods:
        m = mods.pop()
        mods.extend(m.imports)
        src = m.inspect_source()
        if "__global__" in src:
            return src
    raise AssertionError("no CUDA module")


def test_f16x2_arithmetic_stays_finite_on_outlier_activations():
    """The f16x2 GEMV's arithmetic in numpy's float16 (each operation rounded to fp16 as the
    half2 instructions round): codes minus zero point (exact) times the scale (the weight),
    times x, four products summed in fp16, then float32. With outlier activations (+-2000, as
    real models have in a few channels) it matches float64 to fp16 accuracy; multiplying the
    codes by x before the scale (int8 codes up to 127) would overflow fp16."""
    from kiln.runtime import quant_format as qf

    rng = np.random.default_rng(7)
    n, k = 32, 256
    q, s, _ = qf.quantize_rtn(rng.standard_normal((n, k)).astype(np.float32) * k ** -0.5,
                              bits=8, group=k, symmetric=True)
    codes = q.astype(np.float16)  # int8 codes, exact in fp16
    s16 = s.astype(np.float16)
    x = rng.standard_normal(k).astype(np.float16)
    x[rng.choice(k, 4, replace=False)] = np.float16(2000)
    w = (codes * s16).astype(np.float16)  # the half2 multiply by the scale
    prods = (w * x).astype(np.float16).reshape(n, -1, 4)
    partial = prods[..., 0]
    for j in range(1, 4):
        partial = (partial + prods[..., j]).astype(np.float16)
    got = partial.astype(np.float32).sum(-1)
    want = qf.dequantize(q, s.astype(np.float64), None, bits=8, k=k) @ x.astype(np.float64)
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() / np.abs(want).max() < 3e-3
    with np.errstate(over="ignore"):
        codes_first = (codes * x).astype(np.float16).reshape(n, -1, 4).sum(-1, dtype=np.float16)
    assert not np.isfinite(codes_first).all()
