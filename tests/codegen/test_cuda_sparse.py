"""2:4 sparse linears on the CUDA target, on a machine without a GPU: the selector arithmetic of
the sparse decode GEMV (kernels/sparse_gemv.py) picks exactly the columns the `nm` metadata
names (run through LLVM on this CPU, prmt emulated by its PTX definition), the GEMV variants
compile to sm_90 machine code that streams the compressed bytes 16 at a time, and the prefill
GEMM's 2:4 decode (te_ops.nm_decode) equals kiln.runtime.sparse_format's."""

from __future__ import annotations

import re

import numpy as np
import pytest

from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm]


def _prmt(a: np.ndarray, b: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """PTX prmt.b32 (default mode) / CUDA __byte_perm: byte i of the result is byte
    (sel >> 4i) & 7 of the 8 bytes {b, a} (a the low word); our selectors never set bit 3."""
    both = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a, dtype=np.uint64)
    for i in range(4):
        src = (sel.astype(np.uint64) >> np.uint64(4 * i)) & np.uint64(7)
        out |= ((both >> (np.uint64(8) * src)) & np.uint64(0xFF)) << np.uint64(8 * i)
    return out.astype(np.uint32)


def test_prmt_selectors_pick_the_kept_columns():
    from tvm.script import tirx as T

    from kiln.codegen.cuda.kernels.sparse_gemv import _selectors

    @T.prim_func
    def selectors(w: T.Buffer((512,), "uint32"), o: T.Buffer((512, 4), "uint32")):
        for i, p in T.grid(512, 4):
            o[i, p] = _selectors(w[i], p)

    ex = tvm.compile(tvm.IRModule({"main": selectors}), tvm.target.Target({"kind": "llvm"}))
    rng = np.random.default_rng(3)
    words = rng.integers(0, 2**32, 512, dtype=np.uint64).astype(np.uint32)
    out = tvm.runtime.tensor(np.zeros((512, 4), np.uint32))
    ex["main"](tvm.runtime.tensor(words), out)
    sel = out.numpy()
    # the four columns of a group as fp16 bit patterns, two per 32-bit word (low half first)
    cols = rng.integers(0, 2**16, (512, 4), dtype=np.uint64).astype(np.uint32)
    lo, hi = cols[:, 0] | (cols[:, 1] << 16), cols[:, 2] | (cols[:, 3] << 16)
    for p in range(4):
        for h in range(2):
            nib = (words >> np.uint32(8 * p + 4 * h)) & np.uint32(15)
            got = _prmt(lo, hi, (sel[:, p] >> np.uint32(16 * h)) & np.uint32(0xFFFF))
            rows = np.arange(512)
            want = cols[rows, nib & 3] | (cols[rows, nib >> 2] << 16)
            assert (got == want).all(), (p, h)


def test_nm_decode_te_matches_the_format_module():
    from tvm import te

    from kiln.codegen.cuda.kernels.te_ops import nm_decode
    from kiln.runtime.sparse_format import nm_decode as spec
    from kiln.runtime.sparse_format import nm_encode

    rng = np.random.default_rng(5)
    n, k = 24, 64
    w = rng.standard_normal((n, k)).astype(np.float32).reshape(n, k // 4, 4)
    np.put_along_axis(w, np.argsort(np.abs(w), -1)[..., :2], 0, -1)
    w[rng.random((n, k // 4)) < 0.2] = 0  # groups with no non-zero left
    values, meta = nm_encode(w.reshape(n, k))
    v = te.placeholder(values.shape, "float32", name="values")
    m = te.placeholder(meta.shape, "uint8", name="meta")
    f = te.create_prim_func([v, m, nm_decode(v, m, k=k)])
    ex = tvm.compile(tvm.IRModule({"main": f}), tvm.target.Target({"kind": "llvm"}))
    out = tvm.runtime.tensor(np.full((n, k), np.nan, np.float32))
    ex["main"](tvm.runtime.tensor(values), tvm.runtime.tensor(meta), out)
    np.testing.assert_array_equal(out.numpy(), spec(values, meta, k))
    np.testing.assert_array_equal(out.numpy(), w.reshape(n, k))


@needs_cuda_toolchain
@pytest.mark.parametrize("kind", ["plain", "residual", "norm", "swiglu", "qkv", "tail"])
def test_sparse_gemv_variants_stream_compressed_bytes(kind):
    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import sparse_gemv as sg

    f = {"plain": lambda: sg.sparse_gemv_kernel(256, 2048, "float16", "float16", pdl=True),
         "residual": lambda: sg.sparse_gemv_kernel(128, 8192, "float16", "float16",
                                                   residual=True),
         "norm": lambda: sg.sparse_gemv_kernel(96, 1024, "float16", "float32", norm_eps=1e-5),
         "swiglu": lambda: sg.sparse_swiglu_gemv_kernel(256, 2048, "float16", 1e-5, pdl=True),
         "qkv": lambda: sg.sparse_qkv_rope_gemv_kernel(8, 2, 64, 512, "float16", 1e-5),
         "tail": lambda: sg.sparse_gemv_kernel(40, 576, "bfloat16", "bfloat16")}[kind]()
    src = _cuda_source(ct, f.with_attr("global_symbol", "spgemv"))
    assert re.search(r"uint4 v_\w* = \*\(uint4\*\)\(values_ptr", src)  # 16-byte value loads
    assert re.search(r"uint v_\w* = \*\(uint\*\)\(meta_ptr", src)  # 4 bytes of meta per lane
    assert "__byte_perm(" in src and "__shared__" in src
    assert ("griddepcontrol" in src) == (kind in ("plain", "swiglu"))
    assert not sg.supported(100, "float16") and not sg.supported(2048, "float32")


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


@needs_cuda_toolchain
def test_pruned_model_compiles_to_sparse_kernels(tiny_model, tmp_path):
    """--sparsity 2:4 for CUDA (no weights: the pruning config says every linear but the LM head
    is exactly 2:4): each becomes a sparse_linear in the `nm` layout, decoded by the sparse
    GEMVs with the dense path's fusions and prefilled by the dense GEMM on a weight the
    decompress kernel writes."""
    import json

    from kiln.codegen import cuda_toolchain as ct
    from kiln.compiler.compile import compile_model

    art = compile_model(tiny_model, tmp_path / "sp", target="cuda:sm_90", max_seq=64,
                        weights=False, dtype="float16", sparsity="2:4",
                        prune_method="magnitude")
    lib = art / "kernels.so"
    ct.require_fatbin(lib, "sm_90")
    data = lib.read_bytes()
    for kernel in (b"cuda_sparse_qkv_rope_gemv_", b"cuda_sparse_swiglu_gemv_",
                   b"cuda_sparse_gemv_", b"cuda_nm_decompress_", b"fused_nt_matmul"):
        assert kernel in data, kernel
    assert b"sparse_nt_matmul" not in data  # prefill: a decompressed weight, the dense GEMM
    m = json.loads((art / "manifest.json").read_text())
    parts = {p["name"]: p for p in m["params"] if p["name"].endswith((".nm.values", ".nm.meta"))}
    assert len(parts) == 2 * 4 * 2  # q/k/v, o, gate/up, down in each of the 2 layers
    for p in parts.values():
        assert p["dtype"] == ("float16" if p["name"].endswith("values") else "uint8")
        assert p["derivation"]["fn"] == "sparse_encode"
        assert p["derivation"]["attrs"]["layout"] == "nm"


def test_biased_linears_decode_through_the_sparse_gemv(tmp_path):
    """Qwen2's q/k/v projections carry a bias: in decode they still read the 2:4 weight through
    the sparse GEMV (the bias added after it), never decompressing it per token."""
    from kiln.codegen.build import build_module
    from kiln.codegen.targets import resolve
    from kiln.compiler.compile import compile_graph
    from kiln.models.synthetic import write_synthetic
    from kiln.passes.prune_weights import parse_config

    model = write_synthetic("qwen2-tiny", tmp_path / "m", weights=False)
    g = compile_graph(model, max_seq=64, progress=lambda m: None, weights_optional=True,
                      prune=parse_config("2:4", "magnitude"), sparse_target="cuda")
    biased = [n for n in g.nodes if n.op == "sparse_linear" and len(n.inputs) > 4]
    assert biased  # the fused q/k/v projection of each layer
    mod, _ = build_module(g, resolve("cuda:sm_90"))
    decode, prefill = mod["decode"].script(), mod["prefill"].script()
    assert "cuda_sparse_gemv" in decode and "cuda_nm_decompress" not in decode
    assert "cuda_nm_decompress" in prefill
