"""The schedule spaces of kiln's CUDA kernels (kernel names `cuda.<family>`).

Each space's `default` is the constant the kernel used before tuning existed, so an untuned
artifact is the kernel it always was; `valid` keeps launchable configs (at most 1024 threads,
227 KB of shared memory, tiles that divide what they tile, register arrays of sane size);
`build` makes the kernel alone for `kiln tune` (no programmatic dependent launch: a lone
kernel has no predecessor to overlap). Shape dicts name a kernel instance by its static dims
and dtypes plus the rows a call sees: `m` / `s` (1 in decode, the tuned prompt length in
prefill) and, for attention, `past`, the context it is measured at.
"""

from __future__ import annotations

import math

import numpy as np

from kiln.codegen.cuda.kernels import attention as attn
from kiln.codegen.cuda.kernels import flash_attention as flash
from kiln.codegen.cuda.kernels import gemm as gemm_k
from kiln.codegen.cuda.kernels import gemv as gemv_k
from kiln.codegen.cuda.kernels import quant_gemv as qgemv
from kiln.codegen.cuda.kernels import rowwise
from kiln.codegen.cuda.kernels import sparse_gemv as sgemv
from kiln.codegen.cuda.kernels import wgmma_gemm as wgmma_k
from kiln.codegen.schedules import Knob, Space, register

EPS = 1e-5  # the norm epsilon of a kernel built for measuring (its speed does not depend on it)
#: the decode context attention kernels are measured at (the kernels loop over it)
DECODE_PAST = 1024


def config_key(config: dict) -> tuple:
    """A config's values in knob-name order: part of a kernel's cache key (and its name)."""
    return tuple(config[name] for name in sorted(config))


# -- decode GEMVs (kernels/gemv.py): a warp per output row, `chunk` loads in flight per lane ----
# (one row per batch row wherever a GEMV runs: decode and the prefill's LM head, so `m` is 1)

GEMV_KNOBS = (Knob("warps", (2, 4, 8)), Knob("chunk", (4, 8, 16)))


def _gemv_default(shape, target) -> dict:
    split = shape["epilogue"] != "norm" and gemv_k.split_default(shape["k"], shape["dtype"])
    return {"warps": gemv_k.WARPS, "chunk": gemv_k.CHUNK, "split": split}


def _gemv_valid(shape, c, target) -> bool:
    if not c["split"]:
        return True
    step = c["warps"] * 32 * gemv_k._vec(shape["dtype"], shape["k"])
    return shape["epilogue"] != "norm" and shape["k"] % step == 0


def _gemv_build(shape, c, target):
    e = shape["epilogue"]
    return gemv_k.gemv_kernel(shape["n"], shape["k"], shape["dtype"], shape["out_dtype"],
                              residual=e == "residual", norm_eps=EPS if e == "norm" else None,
                              warps=c["warps"], chunk=c["chunk"], split=c["split"])


GEMV = register(Space(
    "cuda.gemv", (*GEMV_KNOBS, Knob("split", (False, True))), _gemv_default, _gemv_valid,
    dynamic=("m",),
    doc="rows (warps) per block, 16-byte loads in flight per lane, or the block's warps "
        "splitting one long row; epilogue '' | 'residual' | 'norm' (rms_norm in front)",
    build=_gemv_build))

GEMV_SWIGLU = register(Space(
    "cuda.gemv_swiglu", GEMV_KNOBS,
    lambda shape, target: {"warps": gemv_k.WARPS, "chunk": gemv_k.CHUNK},
    lambda shape, c, target: c["chunk"] <= 8 or c["warps"] <= 4,  # two weight rows in flight
    dynamic=("m",), doc="rms_norm + gate/up GEMV + SwiGLU: warps per block, loads per lane",
    build=lambda shape, c, target: gemv_k.swiglu_gemv_kernel(
        shape["f"], shape["k"], shape["dtype"], EPS, warps=c["warps"], chunk=c["chunk"])))

GEMV_QKV_ROPE = register(Space(
    "cuda.gemv_qkv_rope", GEMV_KNOBS,
    lambda shape, target: {"warps": gemv_k.WARPS, "chunk": gemv_k.CHUNK},
    lambda shape, c, target: c["chunk"] <= 8 or c["warps"] <= 4,
    dynamic=("m",), doc="rms_norm + q/k/v GEMV + rotary + KV append: warps, loads per lane",
    build=lambda shape, c, target: gemv_k.qkv_rope_gemv_kernel(
        shape["heads"], shape["kv_heads"], shape["head_dim"], shape["k"], shape["dtype"], EPS,
        warps=c["warps"], chunk=c["chunk"]),
    # cos/sin rows; a cache of 16 rows (the kernel writes row past[0], 1 or 2 when measured);
    # one `past` for every row
    bind=lambda shape: {"cb": 1, "cap": 16, "pn": 1}))



def _quant_gemv_default(shape, n: int, swiglu: bool = False) -> dict:
    """The kernel's own defaults for a weight of n rows (SwiGLU: 2f)."""
    return {"warps": qgemv.WARPS, "rows": qgemv.rows_default(n, swiglu),
            "math": qgemv.math_default(shape["bits"], shape["dtype"])}


QUANT_GEMV = register(Space(
    "cuda.quant_gemv",
    (Knob("warps", (2, 4, 8)), Knob("rows", (1, 2, 4)), Knob("math", qgemv.MATHS)),
    lambda shape, target: _quant_gemv_default(shape, shape["n"]),
    lambda shape, c, target: (shape["n"] % c["rows"] == 0
                              and qgemv.math_ok(c["math"], shape["bits"], shape["dtype"])),
    dynamic=("m",),
    doc="int4/int8 weight GEMV: warps per block, output rows per warp (x converted once for "
        "all of them, rows x 16 bytes in flight per lane), codes unpacked to float32 or two "
        "at a time to half2 (fp16)",
    build=lambda shape, c, target: qgemv.quant_gemv_kernel(
        shape["n"], shape["k"], shape["bits"], shape["group"], shape["dtype"],
        shape["out_dtype"], zero_points=shape["zero_points"],
        residual=shape["epilogue"] == "residual",
        norm_eps=EPS if shape["epilogue"] == "norm" else None, **c)))

QUANT_GEMV_SWIGLU = register(Space(
    "cuda.quant_gemv_swiglu",
    (Knob("warps", (2, 4, 8)), Knob("rows", (2, 4, 8)), Knob("math", qgemv.MATHS)),
    lambda shape, target: _quant_gemv_default(shape, 2 * shape["f"], swiglu=True),
    lambda shape, c, target: (shape["f"] % (c["rows"] // 2) == 0
                              and qgemv.math_ok(c["math"], shape["bits"], shape["dtype"])),
    dynamic=("m",),
    doc="(rms_norm +) int4/int8 gate/up GEMV + SwiGLU, y[m, f] of W[2f, k]: warps per block, "
        "weight rows per warp (gate/up pairs: rows / 2 outputs), codes unpacked to float32 or "
        "two at a time to half2 (fp16)",
    build=lambda shape, c, target: qgemv.quant_gemv_kernel(
        2 * shape["f"], shape["k"], shape["bits"], shape["group"], shape["dtype"],
        shape["dtype"], zero_points=shape["zero_points"],
        norm_eps=EPS if shape["norm"] else None, swiglu=True, **c)))

SPARSE_KNOBS = (Knob("warps", (2, 4, 8)), Knob("loads", (8, 16, 32)))


def _sparse_space(kernel: str, doc: str, build, **kw) -> Space:
    """A 2:4 decode GEMV's space (kernels/sparse_gemv.py): warps per block, 16-byte weight
    loads a lane issues together; the kernel's constants by default."""
    return register(Space(kernel, SPARSE_KNOBS,
                          lambda shape, target: {"warps": sgemv.WARPS, "loads": sgemv.LOADS},
                          dynamic=("m",), doc=doc, build=build, **kw))


SPARSE_GEMV = _sparse_space(
    "cuda.sparse_gemv", "2:4 sparse GEMV (x of a block in shared memory): warps (output rows) "
    "per block, 16-byte weight loads a lane issues together",
    lambda shape, c, target: sgemv.sparse_gemv_kernel(
        shape["n"], shape["k"], shape["dtype"], shape["out_dtype"],
        residual=shape["epilogue"] == "residual",
        norm_eps=EPS if shape["epilogue"] == "norm" else None, **c))

SPARSE_GEMV_SWIGLU = _sparse_space(
    "cuda.sparse_gemv_swiglu", "rms_norm + 2:4 sparse gate/up GEMV + SwiGLU: warps (gate/up "
    "row pairs) per block, 16-byte weight loads a lane issues together (over both rows)",
    lambda shape, c, target: sgemv.sparse_swiglu_gemv_kernel(
        shape["f"], shape["k"], shape["dtype"], EPS, **c))

SPARSE_GEMV_QKV_ROPE = _sparse_space(
    "cuda.sparse_gemv_qkv_rope", "rms_norm + 2:4 sparse q/k/v GEMV + rotary + KV append: warps "
    "(rotary row pairs) per block, 16-byte weight loads a lane issues together",
    lambda shape, c, target: sgemv.sparse_qkv_rope_gemv_kernel(
        shape["heads"], shape["kv_heads"], shape["head_dim"], shape["k"], shape["dtype"], EPS,
        **c),
    bind=lambda shape: {"cb": 1, "cap": 16, "pn": 1})  # as cuda.gemv_qkv_rope's


# -- the prefill GEMM: kiln's WMMA tiles (kernels/gemm.py), dlight's schedule (the fp16 default),
# or Hopper's warpgroup MMA (kernels/wgmma_gemm.py, sm_90a targets) ----------------------------

#: the knobs of a WMMA config that wgmma has no use for, at their one value there
WMMA = {"mma": "wmma", "inflight": 0, "staged": False}
TILE_KNOBS = ("bm", "bn", "bk", "wm", "wn", "stages")


def tile(c: dict) -> dict:
    """The WMMA kernel's arguments of a cuda.gemm config."""
    return {k: c[k] for k in TILE_KNOBS}


def wgmma_config(bn: int, stages: int, inflight: int, staged: bool = False) -> dict:
    """A wgmma config in the space's knobs: two warpgroups of 64 rows (bm 128, wm 2), k tiles
    of 64; `bn`, `stages`, `inflight` and `staged` (the output through shared memory) are its
    own."""
    return {"bm": wgmma_k.BM, "bn": bn, "bk": wgmma_k.BK, "wm": 2, "wn": 1, "stages": stages,
            "mma": "wgmma", "inflight": inflight, "staged": staged}


def _wgmma_valid(shape, c, target) -> bool:
    """wgmma takes fp16 and bf16 bias-free GEMMs on an sm_90a target (the `a` features)."""
    return (target is not None and target.arch.endswith("a") and not shape["bias"]
            and c == wgmma_config(c["bn"], c["stages"], c["inflight"], c["staged"])
            and wgmma_k.config_ok(shape["n"], shape["k"], shape["dtype"], shape["out_dtype"],
                                  bn=c["bn"], stages=c["stages"], inflight=c["inflight"],
                                  staged=c["staged"])
            and wgmma_k.shared_bytes(c["bn"], c["stages"]) <= gemm_k.SHARED_LIMIT)


def _gemm_valid(shape, c, target) -> bool:
    """WMMA: tiles that fit, 4-16 warps of 4 or 8 accumulator fragments; kiln's own tiles
    always with a cp.async pipeline of 2 or 3 k tiles (one stage is dlight's default alone).
    wgmma: see _wgmma_valid."""
    if c["mma"] == "wgmma":
        return _wgmma_valid(shape, c, target)
    if c["inflight"] or c["staged"] or c["stages"] > 3:
        return False
    if tile(c) == gemm_k.DLIGHT:
        return True
    warps = c["wm"] * c["wn"]
    frags = (c["bm"] // 16 // c["wm"]) * (c["bn"] // 16 // c["wn"])  # accumulators per warp
    # TVM 0.27 fails to lower these (StorageRewrite hands the fp32 output tile a reused fp16
    # buffer: "tvm_access_ptr element type must match"), seen for every one of them
    broken = c["bk"] == 64 and min(c["bm"], c["bn"]) == 64
    return (c["stages"] > 1 and not broken and warps in (4, 8, 16) and frags in (4, 8)
            and gemm_k.tile_ok(shape["n"], shape["k"], c))


def _gemm_default(shape, target) -> dict:
    """On sm_90a, fp16/bf16 GEMMs without a bias: Hopper's wgmma at its default tile
    (`wgmma_gemm.DEFAULT`; `wgmma_gemm.WGMMA` an A/B switch). Elsewhere dlight's schedule for
    fp16, and for bf16, which dlight leaves on the CUDA cores, kiln's kernel at the tile that
    measured best for most fp16 GEMMs of the 1B shape (run 20)."""
    if wgmma_k.WGMMA and _wgmma_valid(shape, WGMMA_DEFAULT, target):
        return dict(WGMMA_DEFAULT)
    if shape.get("dtype") == "bfloat16" and gemm_k.tile_ok(shape["n"], shape["k"], BF16_TILE):
        return {**BF16_TILE, **WMMA}
    return {**gemm_k.DLIGHT, **WMMA}


#: bf16's default tile: 128 x 128 x 64, 2 x 4 warps, 3 k tiles in flight
BF16_TILE = {"bm": 128, "bn": 128, "bk": 64, "wm": 2, "wn": 4, "stages": 3}
WGMMA_DEFAULT = wgmma_config(**wgmma_k.DEFAULT)


def takes_dlight(c: dict, n: int, k: int, dtype: str) -> bool:
    """Whether config `c` of an n x k GEMM is scheduled by dlight: its WMMA tile is dlight's
    and dlight tensorizes the dtype (fp16; bf16 takes kiln's kernel at that tile, where it fits),
    else kiln's own kernel (gemm.py or wgmma_gemm.py)."""
    return (c["mma"] == "wmma" and tile(c) == gemm_k.DLIGHT
            and (dtype != "bfloat16" or not gemm_k.tile_ok(n, k, c)))


def _gemm_build(shape, c, target):
    kw = {"bias": shape["bias"], "residual": shape["residual"]}
    n, k, dtype, out_dtype = shape["n"], shape["k"], shape["dtype"], shape["out_dtype"]
    if c["mma"] == "wgmma":
        return wgmma_k.wgmma_gemm_kernel(n, k, dtype, out_dtype, residual=shape["residual"],
                                         bn=c["bn"], stages=c["stages"],
                                         inflight=c["inflight"], staged=c["staged"])
    if takes_dlight(c, n, k, dtype):
        return gemm_k.dlight_kernel(n, k, dtype, out_dtype,
                                    target=target.tvm_target() if target else None, **kw)
    return gemm_k.gemm_kernel(n, k, dtype, out_dtype, **kw, **tile(c))


GEMM = register(Space(
    "cuda.gemm", (Knob("bm", (64, 128, 256)), Knob("bn", (64, 128, 256)), Knob("bk", (32, 64)),
                  Knob("wm", (1, 2, 4)), Knob("wn", (1, 2, 4)), Knob("stages", (1, 2, 3, 4)),
                  Knob("mma", ("wmma", "wgmma")), Knob("inflight", (0, 1)),
                  Knob("staged", (False, True))),
    _gemm_default, _gemm_valid, dynamic=("m",),
    doc="fp16/bf16 tensor-core GEMM with its epilogue (bias, cast, residual add). mma wmma: "
        "block tile bm x bn, k tile bk, wm x wn warps, k tiles in shared memory (2, 3: cp.async "
        "pipeline); the default is dlight's Matmul schedule (fp16) or 128x128x64, 2x4 warps, 3 "
        "stages (bf16: dlight does not tensorize it). mma wgmma (fp16/bf16 without bias, sm_90a): "
        "128 x bn tiles of two warpgroups, `stages` k tiles of 64 in shared memory, `inflight` "
        "1: a k tile's MMAs overlap the next one's; `staged`: the output tile leaves through "
        "shared memory in 16-byte rows; the default on sm_90a (bias-free): wgmma 128 x 128, "
        "3 stages, staged",
    build=_gemm_build,
    # prefill's time is its GEMMs', and the valid configs number about 80: measure them all
    max_candidates=96))


# -- attention (kernels/attention.py, kernels/flash_attention.py) -------------------------------

def _attention_args(shape, rng: np.random.Generator, scratch: bool = False) -> list:
    """q, k/v caches holding `past + s` rows (kv8: int8 codes, then their float32 scales),
    past[1] = `past`, (the decode kernel's scratch of its splits' states,) the output."""
    b, s, h, d = 1, shape["s"], shape["heads"], shape["head_dim"]
    cap, dt, kvh = shape["s"] + shape["past"], shape["dtype"], shape["kv_heads"]
    q = rng.standard_normal((b, s, h * d)).astype(dt)
    if shape.get("kv8"):
        caches = [rng.integers(-127, 128, (b, kvh, cap, d), "int8") for _ in "kv"]
        caches += [rng.uniform(0.005, 0.02, (b, kvh, cap, 1)).astype("float32") for _ in "kv"]
    else:
        caches = [rng.standard_normal((b, kvh, cap, d)).astype(dt) for _ in "kv"]
    part = [np.zeros((b, s, h, attn.MAX_SPLITS, d + 2), "float32")] if scratch else []
    return [q, *caches, np.array([shape["past"]], "int32"), *part, np.zeros((b, s, h * d), dt)]


def _attention_bind(shape) -> dict:
    return {"b": 1, "cap": shape["s"] + shape["past"], "pn": 1}  # pn: one past for every row


#: streaming multiprocessors of the GPUs kiln targets (H100/H200 SXM: 132), what the decode
#: attention's default split count fills
SMS = 132


#: the cached lengths CUDA decode entries are scheduled for: `decode` (short contexts, one
#: block per head) and `decode_1024` (split-KV); the runtime runs the nearer on a log scale,
#: so the split entry from about 362 cached tokens (split-KV cost 4.6-6.7% of a 1B decode step
#: at 16 tokens and gained its 0.90 of that rate at 2048: session 10, H100)
DECODE_CONTEXTS = (128, DECODE_PAST)
#: below this cached length the default is one block per head (the first split alone would
#: hold the keys; the others and the merge are overhead)
SPLIT_FROM = 512


def decode_span(past: int) -> tuple[int, int]:
    """The cached lengths the decode entry scheduled for `past` (one of DECODE_CONTEXTS) runs
    at: from the geometric midpoint with the next shorter context (the first: from 16) to the
    one with the next longer (the last: to 4x its own, 4,096 tokens)."""
    i = DECODE_CONTEXTS.index(past) if past in DECODE_CONTEXTS else len(DECODE_CONTEXTS) - 1
    lo = math.isqrt(DECODE_CONTEXTS[i - 1] * past) + 1 if i else 16
    hi = math.isqrt(past * DECODE_CONTEXTS[i + 1]) if i + 1 < len(DECODE_CONTEXTS) else 4 * past
    return lo, hi


def _decode_probes(shape) -> list[dict]:
    """A decode attention instance measured at both ends of its entry's span too: a split
    count tuned at 1,024 cached tokens alone lost to the default at 2,048 (run 45, H100)."""
    return [{**shape, "past": p} for p in decode_span(shape["past"]) if p != shape["past"]]


def _splits_default(heads: int, past: int = DECODE_PAST) -> int:
    """Enough splits of each head's keys for a block per SM at batch 1 where the context is
    long (it then streams from every SM); one for a short one."""
    splits = 1
    while (attn.SPLIT_DECODE and past >= SPLIT_FROM and heads * splits < SMS
           and splits < attn.MAX_SPLITS):
        splits *= 2
    return splits


def warp_decode(head_dim: int) -> bool:
    """Whether decode attention over full (not windowed) keys takes the warp kernel, the one
    with a schedule (cuda.decode_attention) and split-KV: head dims of whole warps."""
    return attn.WARP_DECODE and head_dim % 32 == 0


def decode_contexts(graph, target) -> tuple[int, ...]:
    """Both decode entries where a long context would split some attention's keys (split-KV
    on, the warp kernel, no sliding window, heads too few to fill the SMs), else the one
    (kiln.codegen.backend)."""
    split = any(n.op == "attention" and warp_decode(int(n.attrs["head_dim"]))
                and not n.attrs.get("window") and _splits_default(int(n.attrs["num_heads"])) > 1
                for n in graph.nodes)
    return DECODE_CONTEXTS if split else ()


DECODE_ATTENTION = register(Space(
    "cuda.decode_attention", (Knob("dw", (4, 8, 16, 32)), Knob("du", (4, 8, 16)),
                              Knob("splits", (1, 2, 4, 8, 16))),
    lambda shape, target: {"dw": attn.DW, "du": attn.DU,
                           "splits": _splits_default(shape["heads"],
                                                     shape.get("past", DECODE_PAST))},
    lambda shape, c, target: c["dw"] * c["du"] <= 256,  # keys per step of a block
    doc="decode attention, head dim a multiple of 32: warps per block (the keys split over "
        "them, merged at the end), keys per warp per step (loads in flight), blocks per head "
        "(split-KV: each a share of the context, merged by a second kernel); shape flag kv8: "
        "int8 caches and their scales",
    build=lambda shape, c, target: attn.decode_attention_kernel(
        shape["heads"], shape["kv_heads"], shape["head_dim"], shape["head_dim"] ** -0.5,
        shape["dtype"], kv8=shape.get("kv8", False), **c),
    bind=_attention_bind, make_args=lambda shape, rng: _attention_args(shape, rng, True),
    # all 55 valid configs: each runs for microseconds, at three cached lengths
    probes=_decode_probes, max_candidates=64))

FLASH_PREFILL = register(Space(
    "cuda.flash_prefill", (Knob("warps", (2, 4, 8)), Knob("bk", (32, 64, 128))),
    lambda shape, target: {"warps": flash.WARPS, "bk": flash.BK},
    lambda shape, c, target: flash.tile_ok(shape["head_dim"], c["warps"], c["bk"]),
    dynamic=("s",),
    doc="tensor-core prefill attention: warps of 16 (query, head) rows per block, keys per "
        "K/V tile in shared memory",
    build=lambda shape, c, target: flash.flash_prefill_kernel(
        shape["heads"], shape["kv_heads"], shape["head_dim"], shape["head_dim"] ** -0.5,
        shape["dtype"], ldsm=shape["ldsm"], warps=c["warps"], bk=c["bk"]),
    bind=_attention_bind, make_args=_attention_args))


# -- row kernels (kernels/rowwise.py) -----------------------------------------------------------

RMS_NORM = register(Space(
    "cuda.rms_norm", (Knob("rows", (1, 2, 4, 8, 16)),),
    lambda shape, target: {"rows": rowwise.ROWS}, dynamic=("m",),
    doc="rms_norm: one warp per row, rows (warps) per block",
    build=lambda shape, c, target: rowwise.rms_norm_kernel(
        shape["e"], shape["dtype"], EPS, rows=c["rows"])))

SWIGLU = register(Space(
    "cuda.swiglu", (Knob("threads", (64, 128, 256, 512, 1024)),),
    lambda shape, target: {"threads": rowwise.THREADS}, dynamic=("m",),
    doc="SwiGLU of a gate/up GEMM output: one 16-byte vector per thread, threads per block",
    build=lambda shape, c, target: rowwise.swiglu_kernel(
        shape["f"], shape["dtype"], threads=c["threads"])))
