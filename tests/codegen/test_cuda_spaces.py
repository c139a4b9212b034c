"""The CUDA schedule spaces (kiln.codegen.cuda.spaces): every valid config of a small instance of
each space lowers to CUDA source here (no GPU, no nvcc); the default and one other config per
space compile to sm_90 machine code through `kiln tune`'s path; on a GPU every config computes
what the default does; an untuned artifact records a default schedule for every kernel."""

from __future__ import annotations

import contextlib
import json
import re

import numpy as np
import pytest

from tests.conftest import has_gpu
from tests.helpers import needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm
pytest.importorskip("kiln.codegen.cuda.spaces")  # registers the cuda.* spaces

F16 = "float16"
D = {"phase": "decode", "m": 1}  # a GEMV's rows
#: a small instance of every cuda.* space (the shapes lower.py would pass)
SHAPES = {
    "cuda.gemv": [
        {**D, "n": 64, "k": 4096, "dtype": F16, "out_dtype": F16, "epilogue": "residual"},
        {**D, "n": 40, "k": 520, "dtype": F16, "out_dtype": "float32", "epilogue": ""},
        {**D, "n": 64, "k": 512, "dtype": F16, "out_dtype": F16, "epilogue": "norm"}],
    "cuda.gemv_swiglu": [{**D, "f": 64, "k": 512, "dtype": F16}],
    "cuda.gemv_qkv_rope": [{**D, "heads": 4, "kv_heads": 2, "head_dim": 64, "k": 512,
                            "dtype": F16}],
    "cuda.decode_attention": [{"heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": F16,
                               "phase": "decode", "s": 1, "past": 100},
                              {"heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": F16,
                               "phase": "decode", "s": 1, "past": 100, "kv8": True}],
    "cuda.flash_prefill": [{"heads": 4, "kv_heads": 2, "head_dim": 64, "dtype": F16,
                            "phase": "prefill", "s": 96, "past": 0, "ldsm": True}],
    "cuda.quant_gemv": [
        {**D, "n": 64, "k": 512, "bits": 4, "group": 32, "dtype": F16, "out_dtype": F16,
         "zero_points": False, "epilogue": "residual"},
        {**D, "n": 96, "k": 256, "bits": 8, "group": 64, "dtype": F16, "out_dtype": F16,
         "zero_points": True, "epilogue": "norm"}],
    "cuda.quant_gemv_swiglu": [
        {**D, "f": 64, "k": 512, "bits": 4, "group": 32, "dtype": F16, "zero_points": True,
         "norm": True},
        {**D, "f": 48, "k": 256, "bits": 8, "group": 256, "dtype": F16, "zero_points": False,
         "norm": False}],
    "cuda.sparse_gemv": [
        {**D, "n": 64, "k": 512, "dtype": F16, "out_dtype": F16, "epilogue": "residual"},
        {**D, "n": 40, "k": 1024, "dtype": F16, "out_dtype": "float32", "epilogue": "norm"}],
    "cuda.sparse_gemv_swiglu": [{**D, "f": 64, "k": 512, "dtype": F16}],
    "cuda.sparse_gemv_qkv_rope": [{**D, "heads": 4, "kv_heads": 2, "head_dim": 64, "k": 512,
                                   "dtype": F16}],
    "cuda.gemm": [{"phase": "prefill", "m": 100, "n": 256, "k": 512, "dtype": F16,
                   "out_dtype": F16, "bias": True, "residual": True}],
    "cuda.rms_norm": [{"phase": "prefill", "m": 5, "e": 512, "dtype": F16}],
    "cuda.swiglu": [{"phase": "prefill", "m": 5, "f": 512, "dtype": F16}],
}
CASES = [(k, s) for k, shapes in SHAPES.items() for s in shapes]


def _target():
    return tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})


def _module(kernel: str, shape: dict, configs: list[dict]):
    from kiln.codegen.kernels import with_root_block
    from kiln.codegen.schedules import space

    sp = space(kernel)
    return tvm.IRModule({f"c{i}": with_root_block(sp.build(shape, c, None)).with_attr(
        "global_symbol", f"c{i}") for i, c in enumerate(configs)})


def test_every_cuda_kernel_family_has_a_space():
    from kiln.codegen.schedules import SPACES

    assert {k for k in SPACES if k.startswith("cuda.")} == set(SHAPES)


@pytest.mark.parametrize(("kernel", "shape"), CASES, ids=[f"{k}-{i}" for i, (k, _) in
                                                          enumerate(CASES)])
def test_every_valid_config_lowers_to_cuda_source(kernel, shape):
    """All configs of the instance as one module, lowered to CUDA C (TVM embeds source when
    nvcc is not selected): one kernel per config, none refused by TVM's checks."""
    from kiln.codegen.schedules import space

    configs = space(kernel).configs(shape, None)
    assert len(configs) >= 2, f"{kernel}: nothing to tune for {shape}"
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == len(configs)
    from kiln.codegen.cuda_toolchain import async_copies

    with _target(), async_copies(), _cuda_source() as sources:  # no nvcc: fast
        lib = tvm.compile(_module(kernel, shape, configs), target=_target())
    src = "".join(sources) or "".join(m.inspect_source() for m in lib.mod.imports
                                      if m.kind == "cuda")
    assert all(f"c{i}_kernel" in src for i in range(len(configs)))


@contextlib.contextmanager
def _cuda_source():
    """The CUDA C that TVM's codegen generates, without compiling it. Once TVM's CUDA runtime
    is loaded in this process (an earlier test's cross-compile loads it), codegen hands its
    source to `tvm_callback_cuda_compile` (NVRTC or nvcc); before, it embeds the source. The
    callback is replaced for the duration by one that keeps the source and returns it."""
    import tvm_ffi

    old = tvm.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
    sources: list[str] = []

    def keep(code, *_):
        sources.append(str(code))
        return bytes(str(code), "utf-8")

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", keep, override=True)
    try:
        yield sources
    finally:
        if old is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", old, override=True)
        else:
            tvm_ffi.remove_global_func("tvm_callback_cuda_compile")


@pytest.mark.slow
@needs_cuda_toolchain
def test_default_and_another_config_compile_to_machine_code(tmp_path):
    """Through the harness's compile path (nvcc, sm_90 fatbin): the default and the last valid
    config of every instance in one library."""
    from kiln.codegen.build import compile_kernels
    from kiln.codegen.cuda_toolchain import fatbin_entries
    from kiln.codegen.schedules import space
    from kiln.codegen.targets import CudaTarget

    funcs = {}
    for i, (kernel, shape) in enumerate(CASES):
        configs = space(kernel).configs(shape, None)
        for j, c in enumerate((configs[0], configs[-1])):
            funcs[f"k{i}_c{j}"] = space(kernel).build(shape, c, None)
    compile_kernels(funcs, CudaTarget(arch="sm_90"), tmp_path / "k.so")
    assert ("cubin", "sm_90") in fatbin_entries(tmp_path / "k.so")


def test_the_kv8_decode_attention_space_measures_int8_caches_and_scales():
    """Shape flag kv8: the kernel takes int8 caches and their float32 scales, and the
    arguments `kiln tune` measures it on are those, in order."""
    from kiln.codegen.schedules import space
    from kiln.codegen.tune import arg_specs

    sp = space("cuda.decode_attention")
    shape = SHAPES["cuda.decode_attention"][1]
    func = sp.build(shape, sp.default(shape, None), None)
    args = sp.make_args(shape, np.random.default_rng(0))
    assert [(s["dtype"], tuple(s["shape"])) for s in arg_specs(func, sp.dims(shape))] == [
        (str(a.dtype), a.shape) for a in args]
    assert [str(a.dtype) for a in args[1:5]] == ["int8", "int8", "float32", "float32"]


def test_decode_attention_is_measured_at_both_ends_of_its_entrys_span():
    """`kiln tune` checks and times a decode attention instance at the cached lengths where its
    entry starts and stops serving too (the runtime switches entries at 362/363 tokens), with
    caches long enough for each."""
    from kiln.codegen.schedules import space
    from kiln.codegen.tune import arg_specs
    from kiln.runtime.session import context_entry

    sp = space("cuda.decode_attention")
    shape = SHAPES["cuda.decode_attention"][0]
    spans = {}
    for past in (128, 1024):
        probes = sp.probes({**shape, "past": past})
        assert all({**p, "past": past} == {**shape, "past": past} for p in probes)
        spans[past] = [p["past"] for p in probes]
    assert spans == {128: [16, 362], 1024: [363, 4096]}
    entry = {p: context_entry("decode", p, [128, 1024]) for p in (16, 362, 363, 4096)}
    assert entry == {16: "decode", 362: "decode", 363: "decode_1024", 4096: "decode_1024"}
    probe = sp.probes({**shape, "past": 1024})[1]
    func = sp.build(probe, sp.default(probe, None), None)
    caches = [a.shape for a in sp.make_args(probe, np.random.default_rng(0))[1:3]]
    assert caches == [(1, shape["kv_heads"], 4097, shape["head_dim"])] * 2
    assert [tuple(a["shape"]) for a in arg_specs(func, sp.dims(probe))[1:3]] == caches


def test_defaults_are_the_kernels_constants():
    """An untuned artifact's kernels are the ones built before the spaces existed."""
    from kiln.codegen.cuda.kernels import attention, flash_attention, gemm, gemv, rowwise
    from kiln.codegen.schedules import space

    g = space("cuda.gemv").default(SHAPES["cuda.gemv"][0], None)
    assert g == {"warps": gemv.WARPS, "chunk": gemv.CHUNK, "split": True}  # k = 4096: split
    assert not space("cuda.gemv").default(SHAPES["cuda.gemv"][1], None)["split"]
    # split-KV: blocks for every SM of an H100/H200 at batch 1 (a short context uses one)
    assert space("cuda.decode_attention").default({"heads": 32}, None) == {
        "dw": attention.DW, "du": attention.DU, "splits": 8}
    assert space("cuda.decode_attention").default({"heads": 9}, None)["splits"] == 16
    assert space("cuda.flash_prefill").default({}, None) == {"warps": flash_attention.WARPS,
                                                              "bk": flash_attention.BK}
    assert space("cuda.rms_norm").default({}, None) == {"rows": rowwise.ROWS}
    assert space("cuda.swiglu").default({}, None) == {"threads": rowwise.THREADS}
    # dlight schedules it (the WMMA family's config)
    assert space("cuda.gemm").default({}, None) == {**gemm.DLIGHT, "mma": "wmma", "inflight": 0,
                                                    "staged": False}
    assert gemm.DLIGHT["stages"] == 1


@needs_cuda_toolchain
def test_bf16_gemms_take_kilns_tensor_core_kernel(tmp_path):
    """dlight does not tensorize bf16: its GEMMs default to kiln's WMMA kernel (bf16 fragments),
    which builds to sm_90 machine code; a shape no tile divides keeps dlight's schedule."""
    from kiln.codegen.build import compile_kernels
    from kiln.codegen.cuda import spaces
    from kiln.codegen.cuda.kernels import gemm
    from kiln.codegen.cuda_toolchain import fatbin_entries
    from kiln.codegen.schedules import space
    from kiln.codegen.targets import CudaTarget

    shape = {**SHAPES["cuda.gemm"][0], "dtype": "bfloat16", "out_dtype": "bfloat16"}
    c = space("cuda.gemm").default(shape, None)
    dlight = {**gemm.DLIGHT, **spaces.WMMA}
    assert c == {**spaces.BF16_TILE, **spaces.WMMA} and c in space("cuda.gemm").configs(shape, None)
    assert space("cuda.gemm").default({**shape, "n": 200}, None) == dlight
    funcs = {"bf16_default": space("cuda.gemm").build(shape, c, None),
             "bf16_dlight_tile": space("cuda.gemm").build(shape, dlight, None)}
    assert all("tvm_mma_sync" in f.script() for f in funcs.values())  # WMMA, not CUDA cores
    compile_kernels(funcs, CudaTarget(arch="sm_90"), tmp_path / "k.so")
    assert ("cubin", "sm_90") in fatbin_entries(tmp_path / "k.so")


@needs_cuda_toolchain
def test_wgmma_configs_are_candidates_on_sm90a_only(tmp_path):
    """Hopper's wgmma kernel joins the GEMM space for fp16 and bf16 bias-free GEMMs on an
    sm_90a target (never on sm_90, with a bias or for float32), and its staged 128 x 128 tile
    is the default there (sm_90: dlight's and bf16's WMMA tile); its candidates build to sm_90a
    machine code, bf16's too."""
    from kiln.codegen.build import compile_kernels
    from kiln.codegen.cuda import spaces
    from kiln.codegen.cuda_toolchain import fatbin_entries
    from kiln.codegen.schedules import space
    from kiln.codegen.targets import CudaTarget

    gemm = space("cuda.gemm")
    shape = {"phase": "prefill", "m": 2048, "n": 2048, "k": 2048, "dtype": "float16",
             "out_dtype": "float16", "bias": False, "residual": True}
    hopper = CudaTarget(arch="sm_90a")
    wg = [c for c in gemm.configs(shape, hopper) if c["mma"] == "wgmma"]
    assert {(c["bn"], c["stages"], c["inflight"], c["staged"]) for c in wg} == {
        (bn, s, i, st) for bn in (64, 128, 256) for s in (2, 3, 4) for i in (0, 1)
        for st in (False, True) if 2 + i <= s}  # (fp16 out: every staged tile fits)
    assert gemm.default(shape, hopper) == spaces.WGMMA_DEFAULT
    assert spaces.WGMMA_DEFAULT["staged"] and spaces.WGMMA_DEFAULT["bn"] == 128
    assert gemm.default(shape, CudaTarget(arch="sm_90"))["mma"] == "wmma"
    assert gemm.default({**shape, "bias": True}, hopper)["mma"] == "wmma"
    for other, tgt in (({}, CudaTarget(arch="sm_90")), ({"bias": True}, hopper),
                       ({"dtype": "float32", "out_dtype": "float32"}, hopper)):
        assert not any(c["mma"] == "wgmma" for c in gemm.configs({**shape, **other}, tgt))
    assert spaces.WGMMA_DEFAULT in wg
    bf16 = {**shape, "dtype": "bfloat16", "out_dtype": "bfloat16"}
    assert [c for c in gemm.configs(bf16, hopper) if c["mma"] == "wgmma"] == wg
    assert gemm.default(bf16, hopper) == spaces.WGMMA_DEFAULT
    assert gemm.default(bf16, CudaTarget(arch="sm_90")) == {**spaces.BF16_TILE, **spaces.WMMA}
    lm_head = {**shape, "out_dtype": "float32", "residual": False}
    assert not any(c["staged"] and c["bn"] == 256 and c["stages"] == 2
                   for c in gemm.configs(lm_head, hopper))  # its fp32 tile would not fit
    funcs = {f"wg{i}": gemm.build(shape, c, hopper) for i, c in enumerate(wg[:2])}
    funcs["wg_staged"] = gemm.build(shape, next(c for c in wg if c["staged"]), hopper)
    funcs["wg_bf16"] = gemm.build(bf16, wg[0], hopper)
    assert '"bf16"' in funcs["wg_bf16"].script() and '"f16"' not in funcs["wg_bf16"].script()
    compile_kernels(funcs, hopper, tmp_path / "k.so")
    assert ("cubin", "sm_90") in fatbin_entries(tmp_path / "k.so")  # (sm_90a reports sm_90)


def test_invalid_configs_are_left_out():
    from kiln.codegen.schedules import space

    gemv = space("cuda.gemv").configs(SHAPES["cuda.gemv"][1], None)  # k = 520: no split
    assert not any(c["split"] for c in gemv)
    flash = space("cuda.flash_prefill").configs(SHAPES["cuda.flash_prefill"][0], None)
    assert {"warps": 8, "bk": 32} in flash and all(c["bk"] * 8 % (c["warps"] * 32) == 0
                                                  for c in flash)


def test_untuned_1b_model_picks_a_default_schedule_for_every_kernel(tmp_path):
    """The Llama-3.2-1B shape (no weights; lowered, not compiled) uses every cuda.* space, each
    instance's config from the cost model (source: default, what the manifest records)."""
    picks = _schedules_of_1b(tmp_path)
    assert {p["kernel"] for p in picks} == set(SHAPES) - QUANT - SPARSE
    assert all(p["source"] == "default" for p in picks)


QUANT = {"cuda.quant_gemv", "cuda.quant_gemv_swiglu"}
SPARSE = {"cuda.sparse_gemv", "cuda.sparse_gemv_swiglu", "cuda.sparse_gemv_qkv_rope"}


def test_a_2to4_1b_model_schedules_every_sparse_gemv(tmp_path):
    """At 2:4 every decode GEMV of the 1B shape's layers is a sparse one with a schedule space
    (o/down, gate/up + SwiGLU, q/k/v + rotary); the LM head stays dense."""
    kernels = {p["kernel"] for p in _schedules_of_1b(tmp_path, sparsity="2:4")}
    assert kernels >= SPARSE
    assert not kernels & {"cuda.gemv_swiglu", "cuda.gemv_qkv_rope"}


def _schedules_of_1b(tmp_path, sparsity: str | None = None) -> list[dict]:
    """The schedule picks (manifest records) of the Llama-3.2-1B shape, no weights, lowered
    for sm_90 fp16 (not compiled); `sparsity`: pruned by magnitude first."""
    pytest.importorskip("tvm.relax")
    from kiln.codegen.build import build_module
    from kiln.codegen.schedules import Schedules
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_graph
    from kiln.models.synthetic import write_synthetic
    from kiln.passes.prune_weights import parse_config

    src = write_synthetic("llama-3.2-1b", tmp_path / "m", weights=False)
    target = CudaTarget(arch="sm_90", dtype="float16")
    pruned = {"prune": parse_config(sparsity, "magnitude"),
              "sparse_target": target.sparse_target()} if sparsity else {}
    graph = compile_graph(src, max_seq=256, progress=lambda m: None, weights_optional=True,
                          **pruned)
    schedules = Schedules(target)
    build_module(graph, target, schedules=schedules)
    return schedules.manifest()


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize(("kernel", "shape"), CASES, ids=[f"{k}-{i}" for i, (k, _) in
                                                          enumerate(CASES)])
def test_every_config_computes_what_the_default_does(kernel, shape, tmp_path):
    """On the GPU: each valid config's outputs against the default config's, same inputs."""
    from kiln.codegen.build import compile_kernels
    from kiln.codegen.schedules import space
    from kiln.codegen.targets import CudaTarget
    from kiln.codegen.tune import arg_specs
    from kiln.runtime.tvm_runtime import load_cuda_runtime

    sp = space(kernel)
    configs = sp.configs(shape, None)
    funcs = {f"c{i}": sp.build(shape, c, None) for i, c in enumerate(configs)}
    compile_kernels(funcs, CudaTarget(arch="sm_90"), tmp_path / "k.so")
    load_cuda_runtime(tvm)
    lib, dev = tvm.runtime.load_module(str(tmp_path / "k.so")), tvm.cuda(0)
    rng = np.random.default_rng(0)
    if sp.make_args is not None:
        host = sp.make_args(shape, rng)
    else:
        specs = arg_specs(funcs["c0"], sp.dims(shape))
        host = [rng.integers(1, 3, s["shape"]).astype(s["dtype"])
                if s["dtype"].startswith("int") else
                rng.standard_normal(s["shape"]).astype(s["dtype"]) for s in specs]
    outs = []
    for name in funcs:
        args = [tvm.runtime.tensor(a.copy(), dev) for a in host]
        lib[name](*args)
        outs.append([a.numpy().astype(np.float32) for a in args[-sp.outputs:]])
    for c, got in zip(configs[1:], outs[1:], strict=True):
        for want, g in zip(outs[0], got, strict=True):
            err = np.abs(g - want).max() / max(np.abs(want).max(), 1e-6)
            assert err <= 2e-3, f"{kernel} {c}: relative error {err:.2e} vs the default"


@pytest.mark.slow
@needs_cuda_toolchain
def test_tuning_plan_builds_for_cuda(tiny_model, tmp_path):
    """`kiln tune --target cuda`'s build side on the tiny llama: every instance's candidates
    compile to one sm_90 library each, the default first."""
    from kiln.codegen.cuda_toolchain import require_fatbin
    from kiln.codegen.targets import CudaTarget
    from kiln.codegen.tune import instances, write_plan
    from kiln.compiler.compile import compile_graph

    target = CudaTarget(arch="sm_90", dtype="float16")
    graph = compile_graph(tiny_model, max_seq=64, progress=lambda m: None,
                          weights_optional=True)
    found = instances(graph, target, 32)
    plan = write_plan(found, target, tmp_path, max_candidates=2)
    assert {i["kernel"] for i in plan["instances"]} >= {"cuda.gemv", "cuda.gemm"}
    for inst in plan["instances"]:
        require_fatbin(tmp_path / inst["lib"], "sm_90")
        assert 1 <= len(inst["candidates"]) <= 2


def test_the_gemm_space_is_measured_whole_unless_capped():
    """The GEMM's ~50 tiles are all measured by default (prefill's time is its GEMMs');
    an explicit --max-candidates still caps them."""
    from kiln.codegen.schedules import space
    from kiln.codegen.tune import MAX_CANDIDATES, candidates

    shape = {"phase": "prefill", "m": 2048, "n": 2048, "k": 2048, "dtype": "float16",
             "out_dtype": "float16", "bias": False, "residual": False}
    every = space("cuda.gemm").configs(shape, None)
    assert len(every) > MAX_CANDIDATES
    assert candidates(space("cuda.gemm"), shape, None) == every
    assert len(candidates(space("cuda.gemm"), shape, None, cap=3)) == 3


def test_a_tuning_entry_of_an_older_space_is_ignored_with_a_warning():
    """A database measured before decode attention had its `splits` knob: the entry is left
    to the cost model, in one warning line (a value outside the choices stays an error)."""
    from kiln.codegen.schedules import TuningDB
    from kiln.compiler.errors import KilnError

    db = TuningDB({"kind": "cuda"})
    db.record("cuda.decode_attention", "k", {"dw": 32, "du": 4}, 1.0, 1.3)
    with pytest.warns(UserWarning, match=r"knobs \['du', 'dw'\].*re-run `kiln tune`") as seen:
        assert db.lookup("cuda.decode_attention", "k") is None
    assert "\n" not in str(seen[0].message)
    db.record("cuda.decode_attention", "k", {"dw": 3, "du": 4, "splits": 1}, 1.0, 1.3)
    with pytest.raises(KilnError, match="dw=3"):
        db.lookup("cuda.decode_attention", "k")


@pytest.mark.slow
@needs_cuda_toolchain
def test_a_tuned_wgmma_gemm_is_what_the_artifact_runs(tmp_path):
    """Untuned, an sm_90a artifact's bias-free prefill GEMMs run wgmma's default tile (an sm_90
    artifact's run dlight's); a tuning file whose GEMMs chose other wgmma configs (what `kiln
    tune --target cuda:sm_90a` measures) compiles into an artifact whose manifest records them
    as tuned."""
    from kiln.codegen.cuda import spaces
    from kiln.codegen.schedules import TuningDB, target_key
    from kiln.codegen.targets import CudaTarget
    from kiln.compiler.compile import compile_model
    from kiln.models.synthetic import write_synthetic

    def gemms(art):
        return [s for s in json.loads((art / "manifest.json").read_text())["schedules"]
                if s["kernel"] == "cuda.gemm"]

    src = write_synthetic("llama-tiny", tmp_path / "m", weights=True)
    hopper = CudaTarget(arch="sm_90a", dtype="float16")
    untuned = compile_model(src, tmp_path / "untuned", target="cuda:sm_90a", dtype="float16",
                            max_seq=256)
    bias_free = [s for s in gemms(untuned) if "bias=False" in s["shape"]]
    # (the default tile is 128 columns wide: narrower outputs keep dlight's GEMM)
    wide = [s for s in bias_free if int(re.search(r"\bn=(\d+)", s["shape"])[1]) % 128 == 0]
    assert wide and all(s["config"] == spaces.WGMMA_DEFAULT and s["source"] == "default"
                        for s in wide)
    assert all(s["config"]["mma"] == "wmma" for s in bias_free if s not in wide)
    assert b"cuda_wgmma_gemm" in (untuned / "kernels.so").read_bytes()
    sm90 = compile_model(src, tmp_path / "sm90", target="cuda:sm_90", dtype="float16",
                         max_seq=256)
    assert all(s["config"]["mma"] == "wmma" for s in gemms(sm90))
    assert b"cuda_wgmma_gemm" not in (sm90 / "kernels.so").read_bytes()
    pick = spaces.wgmma_config(64, 3, 1)
    db = TuningDB(target_key(hopper))
    for s in bias_free:
        db.record("cuda.gemm", s["shape"], pick, 1e-5, 2e-5)
    db.save(tmp_path / "tuning.json")
    tuned = compile_model(src, tmp_path / "tuned", target="cuda:sm_90a", dtype="float16",
                          max_seq=256, tuning=tmp_path / "tuning.json")
    recorded = [s for s in gemms(tuned) if s["shape"] in db.entries["cuda.gemm"]]
    assert recorded and all(s["config"] == pick and s["source"] == "tuned" for s in recorded)


def test_dlight_tensorizes_for_sm90a_as_for_sm90():
    """TVM's dlight reads `sm_90a` as no tensor cores (its arch check wants digits only); kiln
    makes it read the number, so an sm_90a build's dlight GEMMs are the sm_90 ones."""
    from kiln.codegen.cuda.kernels import gemm

    def script(arch):
        t = tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
        return gemm.dlight_kernel(256, 512, "float16", "float16", target=t).script()

    assert "tvm_mma_sync" in script("sm_90")
    assert script("sm_90a") == script("sm_90")


@pytest.mark.slow
@needs_cuda_toolchain
def test_long_contexts_get_their_own_split_kv_decode_entry(tmp_path):
    """A model whose decode attention splits long contexts (SmolLM2's shape: 9 heads of 64)
    compiles two decode entries: `decode` scheduled at 128 cached tokens, one block per head
    (the split-KV's extra blocks and merge kernel cost 5-7% of a short-context step), and
    `decode_1024` with the blocks that fill the SMs; a model whose attention never splits
    (head dim 16: the thread kernel) keeps one."""
    from kiln.compiler.compile import compile_model
    from kiln.models.synthetic import write_synthetic

    def manifest(name):
        src = write_synthetic(name, tmp_path / name)
        art = compile_model(src, tmp_path / f"{name}-art", target="cuda", dtype="float16",
                            max_seq=256, weights=False)
        return json.loads((art / "manifest.json").read_text())

    m = manifest("smollm2-135m")
    assert m["decode_past"] == [128, 1024] and "decode_1024" in m["entry_points"]
    splits = {s["shape"].split("past=")[1].split(",")[0]: s["config"]["splits"]
              for s in m["schedules"] if s["kernel"] == "cuda.decode_attention"}
    assert splits == {"128": 1, "1024": 16}
    tiny = manifest("llama-tiny")
    assert tiny["decode_past"] == [] and "decode_1024" not in tiny["entry_points"]
