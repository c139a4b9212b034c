"""The schedule spaces of kiln's CPU kernels (kernel names `cpu.<family>`).

Each space's `default` is what the kernels used before tuning existed (measured on Zen 4 for the
SmolLM2 shapes); `valid` drops configs that cannot run or change nothing (a knob the phase never
reads); `build` makes the kernel alone for measuring. Every shape dict carries the phase
("prefill" | "decode") and the rows a call sees (`m`, or `s`/`past` for attention): 1 in decode,
the tuned prompt length in prefill; rows are dynamic (bucketed by powers of two).
"""

from __future__ import annotations

import numpy as np

from kiln.codegen.kernels import attention as attn_k
from kiln.codegen.kernels import elementwise as ew
from kiln.codegen.kernels import linear as lin
from kiln.codegen.kernels import packed_linear as plin
from kiln.codegen.kernels import prefill_attention as pattn
from kiln.codegen.kernels import quant_linear as qk
from kiln.codegen.kernels import sparse_linear as sk
from kiln.codegen.schedules import Knob, Space, register
from kiln.runtime import sparse_format as sf

#: int4 weights: one-block GEMV panels split evenly over the threads and beat 4-block ones by
#: 18% in SmolLM2's decode (benchmarks/RESULTS.md; the int4 loop is bound by its unpacking, not
#: FMA latency); int8: the width made no difference
QUANT_GEMV_NV = {4: 1, 8: 4}
#: sparse GEMV defaults per CPU vendor (CpuTarget.vendor; others take AMD's): panel width
#: `gemv_nv` (blocks per task), accumulator `chains` per block taking the columns in turn, and
#: the software `prefetch` of the values stream, bytes ahead.
#: AMD (Zen 4, session 11): one-block panels and two chains (SmolLM2 at 70% zeros, fp32, decode
#: vs dense: 1.14-1.18x with the earlier two-block panels, 1.64-1.65x with these); every
#: prefetch distance was slower there.
#: Intel (session 15): its prefetchers leave the expand-loads' stream (each load at an offset
#: the previous popcounts give) to fetch on demand, so one core streams a 70%-zeros weight from
#: DRAM 1.6x faster with a prefetch 8 KB ahead (C model of the loop); `kiln tune --sparsity 0.7`
#: there (session 16, twice) chose two-block panels with four chains in seven of SmolLM2's
#: eight decode GEMV winners, most often 16 KB ahead (1.05-1.29x the earlier default per
#: kernel; 0.7 decode end to end 1.60x -> 1.70x dense).
SPARSE_GEMV = {"intel": {"gemv_nv": 2, "chains": 4, "prefetch": 16384},
               "amd": {"gemv_nv": 1, "chains": 2, "prefetch": 0}}


def _decode(shape) -> bool:
    return shape["phase"] == "decode"


def _lanes(target) -> int:
    return target.lanes(4) if hasattr(target, "lanes") else 16


# -- cpu.linear: row-major weights (kernels/linear.py) ------------------------------------------

def _linear_default(shape, target) -> dict:
    c = lin.DECODE if _decode(shape) else lin.PREFILL
    return {"mr": c.mr, "nr": c.nr, "mb": c.mb, "nb": c.nb, "prefetch": c.prefetch}


def _linear_valid(shape, c, target) -> bool:
    blocking = (c["mb"], c["nb"]) in ((0, 0), (96, 64), (192, 128))
    fits = c["mr"] * c["nr"] + c["mr"] + c["nr"] <= 32  # accumulators + loads in 32 registers
    one_row = not _decode(shape) or (c["mr"] == 1 and c["mb"] == 0)
    return blocking and fits and one_row and c["nr"] <= shape["n"]


LINEAR = register(Space(
    "cpu.linear",
    (Knob("mr", (1, 2, 4, 6)), Knob("nr", (1, 2, 4, 8, 16)), Knob("mb", (0, 96, 192)),
     Knob("nb", (0, 64, 128)), Knob("prefetch", (0, 4))),
    _linear_default, _linear_valid, dynamic=("m",),
    doc="register tile mr x nr, x-row/weight-row cache blocks, weight prefetch distance",
    build=lambda shape, c, target: lin.linear_kernel(
        shape["n"], shape["k"], lin.LinearConfig(**c), bias=shape["bias"],
        lanes=_lanes(target), dtype=shape["dtype"])))


# -- cpu.packed_linear: weights packed [N/B, K, B] (kernels/packed_linear.py) -------------------

def _packed_default(shape, target) -> dict:
    c = plin.DECODE if _decode(shape) else plin.PREFILL
    return {"mr": c.mr, "nv": c.nv}


def _packed_valid(shape, c, target) -> bool:
    fits = c["mr"] * c["nv"] + c["nv"] + 1 <= 32
    return fits and (c["mr"] == 1) == _decode(shape)


PACKED_LINEAR = register(Space(
    "cpu.packed_linear",
    (Knob("mr", tuple(sorted({c.mr for c in plin.SEARCH_SPACE}))),
     Knob("nv", tuple(sorted({c.nv for c in plin.SEARCH_SPACE})))),
    _packed_default, _packed_valid, dynamic=("m",),
    doc="register tile: mr rows of x by nv vectors of output columns (one parallel panel)",
    build=lambda shape, c, target: plin.packed_linear_kernel(
        shape["n"], shape["k"], plin.PackedConfig(**c), bias=shape["bias"],
        lanes=shape["block"], dtype=shape["dtype"])))


# -- cpu.quant_linear / cpu.sparse_linear: GEMV panels (decode), GEMM tiles (prefill) -----------

def _panel_valid(gemv_default):
    def valid(shape, c, target) -> bool:
        if c["mr"] * c["nv"] + c["nv"] + 1 > 32 or c["mr"] == 1:
            return False
        d = _panel_default(gemv_default)(shape, target)
        if shape["m"] <= qk.GEMV_ROWS:  # only the GEMV runs: the GEMM tile is never read
            return (c["mr"], c["nv"]) == (d["mr"], d["nv"])
        return c["gemv_nv"] == d["gemv_nv"]  # and the other way round
    return valid


def _panel_default(gemv_default):
    def default(shape, target) -> dict:
        return {"mr": plin.PREFILL.mr, "nv": plin.PREFILL.nv, "gemv_nv": gemv_default(shape)}
    return default


_PANEL_KNOBS = (Knob("mr", (4, 6, 8, 12)), Knob("nv", (2, 3, 4, 6)), Knob("gemv_nv", (1, 2, 4)))


def _quant_scheme(shape) -> qk.QuantScheme:
    return qk.QuantScheme(shape["n"], shape["k"], shape["bits"], shape["group"],
                          zero_points=shape["zp"], act_bits=shape.get("act", 0))


def _quant_gemv(shape) -> int:
    return QUANT_GEMV_NV[shape["bits"]]


QUANT_LINEAR = register(Space(
    "cpu.quant_linear", _PANEL_KNOBS, _panel_default(_quant_gemv), _panel_valid(_quant_gemv),
    dynamic=("m",),
    doc="GEMM register tile mr x nv (prefill), GEMV panel width gemv_nv (decode)",
    build=lambda shape, c, target: qk.quant_linear_kernel(
        _quant_scheme(shape), plin.PackedConfig(c["mr"], c["nv"]), c["gemv_nv"],
        bias=shape["bias"], vnni=getattr(target, "vnni", False))))


def _sparse_shape(shape) -> sk.SparseShape:
    return sk.SparseShape(shape["n"], shape["k"], shape["capacity"], shape["values"])


def _sparse_args(shape, rng) -> list:
    """x, values, meta, (scales,) (bias,) y: a weight whose blocks fit the layout's capacity."""
    n, k, cap = shape["n"], shape["k"], shape["capacity"]
    keep = min(cap - sf.BLOCK, sf.BLOCK * k)
    w = np.zeros((n // sf.BLOCK, sf.BLOCK * k), np.float32)
    for row in w:
        row[rng.choice(row.size, keep, replace=False)] = rng.standard_normal(keep)
    w = w.reshape(n // sf.BLOCK, k, sf.BLOCK).transpose(0, 2, 1).reshape(n, k)
    scales = None
    if shape["values"] == "int8":
        scales = (np.abs(w).max(axis=1, keepdims=True) / 127 + 1e-6).astype(np.float32)
        w = np.round(w / scales).astype(np.int8)
    values, meta = sf.bitmap_encode(w, cap)
    args = [rng.standard_normal((shape["m"], k)).astype(np.float32), values, meta]
    if scales is not None:
        args.append(scales.reshape(n))
    if shape["bias"]:
        args.append(rng.standard_normal(n).astype(np.float32))
    return [*args, np.zeros((shape["m"], n), np.float32)]


def sparse_gemv_default(target) -> dict:
    """The sparse GEMV's gemv_nv, chains and prefetch on `target` (SPARSE_GEMV)."""
    return SPARSE_GEMV.get(getattr(target, "vendor", ""), SPARSE_GEMV["amd"])


def _sparse_default(shape, target) -> dict:
    g = sparse_gemv_default(target)
    return {**_panel_default(lambda s: g["gemv_nv"])(shape, target),
            "chains": sk.gemv_chains(_sparse_shape(shape), g["chains"]),
            "prefetch": g["prefetch"]}


def _sparse_valid(shape, c, target) -> bool:
    d = _sparse_default(shape, target)
    if not _panel_valid(lambda s: d["gemv_nv"])(shape, c, target):
        return False
    if shape["m"] > qk.GEMV_ROWS:  # the GEMM runs: the GEMV's knobs are never read
        return (c["chains"], c["prefetch"]) == (d["chains"], d["prefetch"])
    # four accumulator vectors (64 floats) under masked FMAs: LLVM keeps the buffer as one
    # <64 x float> and permutes it whole every iteration (vpermt2ps; ~3x slower, measured)
    return sk.gemv_chains(_sparse_shape(shape), c["chains"]) == c["chains"] and \
        c["gemv_nv"] * c["chains"] != 4


SPARSE_LINEAR = register(Space(
    "cpu.sparse_linear",
    (*_PANEL_KNOBS, Knob("chains", (1, 2, 4)), Knob("prefetch", (0, 2048, 4096, 8192, 16384))),
    _sparse_default, _sparse_valid, dynamic=("m",),
    doc="GEMM register tile mr x nv (prefill); GEMV panel width gemv_nv, accumulator chains "
        "per block and software prefetch distance in bytes (decode)",
    build=lambda shape, c, target: sk.sparse_linear_kernel(
        _sparse_shape(shape), plin.PackedConfig(c["mr"], c["nv"]), c["gemv_nv"],
        bias=shape["bias"], avx512=target.vector_bits >= 512, chains=c["chains"],
        prefetch=c["prefetch"]),
    make_args=_sparse_args,
    # every decode config (about 30; 12 spread over them missed the gate/up GEMV's best, 1.9x
    # its default on an Intel host)
    max_candidates=48))


# -- cpu.attention: query-tiled (prefill_attention.py) or one query per task (attention.py) ----

def _tileable(shape) -> bool:
    return shape["head_dim"] % pattn.B == 0 and shape["dtype"] == "float32"


def _attention_default(shape, target) -> dict:
    return {"tiled": _tileable(shape) and not _decode(shape),
            "queries": pattn.tile_queries(shape["heads"], shape["kv_heads"]), "block": 32}


def _attention_valid(shape, c, target) -> bool:
    d = _attention_default(shape, target)
    group = shape["heads"] // shape["kv_heads"]
    if c["tiled"]:  # the block knob is the other kernel's
        return _tileable(shape) and c["block"] == d["block"] and c["queries"] * group <= 48
    return c["queries"] == d["queries"]


def _attention_build(shape, c, target):
    h, kvh, d = shape["heads"], shape["kv_heads"], shape["head_dim"]
    common = {"causal": shape["causal"], "masked": shape["masked"], "dtype": shape["dtype"],
              "mask_dtype": shape["mask_dtype"], "quantized": shape["q8"],
              "window": shape["window"]}
    if c["tiled"]:
        return pattn.prefill_attention_kernel(h, kvh, d, shape["scale"], queries=c["queries"],
                                              **common)
    return attn_k.attention_kernel(h, kvh, d, shape["scale"], block=c["block"], **common)


ATTENTION = register(Space(
    "cpu.attention",
    (Knob("tiled", (True, False)), Knob("queries", (1, 2, 3, 4, 6, 8, 12, 24)),
     Knob("block", (16, 32, 64))),
    _attention_default, _attention_valid, dynamic=("s", "past"),
    doc="query tiles sharing K/V loads (queries per task), or one query per task over key "
        "blocks of `block`",
    build=_attention_build,
    bind=lambda shape: {"b": 1, "s": shape["s"], "cap": shape["s"] + shape["past"],
                        "past": shape["past"]}))


# -- cpu.rowwise: element-wise and row kernels on the thread pool or not ------------------------

def _rowwise_build(shape, c, target):
    """The kernel of `op` alone, for the ops worth measuring (None: not measured)."""
    op, dtype, lanes, par = shape["op"], shape["dtype"], _lanes(target), c["parallel"]
    kind, _, name = op.partition(":")
    if kind == "rms_norm":
        return ew.rms_norm_kernel(shape["e"], 1e-5, lanes=lanes, dtype=dtype, parallel=par)
    if kind == "unary" and name in ew.UNARY:
        return ew.unary_kernel(ew.UNARY[name], lanes=lanes, dtype=dtype, parallel=par)
    if kind == "binary" and name in ew.BINARY:
        return ew.binary_kernel(ew.BINARY[name], lanes=lanes, dtype=dtype, parallel=par)
    return None


ROWWISE = register(Space(
    "cpu.rowwise", (Knob("parallel", (True, False)),),
    lambda shape, target: {"parallel": not _decode(shape)}, dynamic=("m",),
    doc="whether a memory-bound kernel runs on the thread pool (one token: launching the pool "
        "costs more than the work)",
    build=_rowwise_build,
    bind=lambda shape: {"m": shape["m"], "n": shape["m"] * shape["e"]}))
