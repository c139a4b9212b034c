"""CPU sparse_linear kernels (bitmap layout) vs the dense packed ones, side by side, SmolLM2 shapes.

    python benchmarks/sparse_kernels.py [--repeat N] [--json F] [--avx2]

For each layer shape, weight dtype (fp32 vs packed fp32; int8 vs w8 `quant_linear`) and fraction
of zeros: decode GEMV time (m = 1, cycling through weight copies larger than the L3, so weights
come from DRAM as in decode) and prefill GEMM time (m = 512), medians. `efficiency` is the
measured speedup over the dense kernel divided by the byte ratio (dense bytes / sparse bytes);
`hot` is each kernel's rate with its weight in cache (its compute bound): kiln.passes.sparsify's
cost model takes these rates and the memory bandwidth (SPARSE_TARGETS).
Every kernel is checked against numpy before it is timed. `--avx2` compiles every kernel, dense
and sparse, for an AVX2 CPU (-mcpu znver3, 256-bit vectors: the sparse kernels' AVX2 + BMI2
permutes instead of AVX-512's vexpand), what an AVX2-only host would run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cpu_kernels import cycle_time, median_time

SHAPES = [(576, 576), (1536, 576), (576, 1536)]  # (N, K): SmolLM2's o/gate/up and down
FRACTIONS = (0.3, 0.5, 0.7)


def _pruned(rng, n: int, k: int, fraction: float) -> np.ndarray:
    w = rng.standard_normal((n, k), dtype=np.float32)
    order = np.argsort(rng.random((n, k)), axis=1)[:, :round(fraction * k)]
    np.put_along_axis(w, order, 0, axis=1)
    return w


TARGET = None  # kiln.codegen.targets.CpuTarget (main sets it)


def _compile(func):
    import tvm

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    return tvm.compile(mod, target=TARGET.tvm_target())["main"]


def _kernels(w: np.ndarray, dtype: str):
    """{"dense": (kernel, operands), "sparse": (...)} for weight w, and their byte counts."""
    from kiln.codegen.cpu_spaces import QUANT_GEMV_NV as GEMV_NV
    from kiln.codegen.cpu_spaces import sparse_gemv_default
    from kiln.codegen.kernels import packed_linear as plin
    from kiln.codegen.kernels import quant_linear as ql
    from kiln.codegen.kernels import sparse_linear as sl
    from kiln.codegen.kernels.packed_linear import PREFILL as GEMM
    from kiln.passes.quantize import blocked
    from kiln.runtime import sparse_format as sf

    n, k = w.shape
    if dtype == "float32":
        dense = [plin.pack(w, 16)]
        fd = {m: _compile(plin.packed_linear_kernel(n, k, cfg))
              for m, cfg in ((1, plin.DECODE), (512, plin.PREFILL))}
        values, meta = sf.bitmap_encode(w)
        sparse, scales = [values, meta], None
        dense_bytes = w.nbytes
    else:
        scales = (np.abs(w).max(1) / 127).astype(np.float32)
        q = np.round(w / scales[:, None]).astype(np.int8)
        dense = [blocked(q), blocked(scales[:, None])]
        s = ql.QuantScheme(n, k, 8, k)
        kern = _compile(ql.quant_linear_kernel(s, GEMM, GEMV_NV[8]))
        fd = {1: kern, 512: kern}
        values, meta = sf.bitmap_encode(q)
        sparse = [values, meta, scales]
        w = q.astype(np.float32) * scales[:, None]
        dense_bytes = q.nbytes + scales.nbytes
    shape = sl.SparseShape(n, k, values.shape[1], dtype)
    g = sparse_gemv_default(TARGET)  # the GEMV's defaults on this CPU
    fs = _compile(sl.sparse_linear_kernel(shape, GEMM, g["gemv_nv"], chains=g["chains"],
                                          prefetch=g["prefetch"],
                                          avx512=TARGET.vector_bits >= 512))
    sparse_bytes = sum(a.nbytes for a in sparse)
    return w, (fd, dense, dense_bytes), (fs, sparse, sparse_bytes)


def _time(fd, fs, dense: list, sparse: list, w: np.ndarray, m: int, copies: int,
          repeat: int, rng) -> dict:
    """Dense and sparse kernel times at m rows (checked against numpy first)."""
    import tvm

    n, k = w.shape
    x = rng.standard_normal((m, k), dtype=np.float32)
    xt, y = tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((m, n), np.float32))
    d_ops = [[tvm.runtime.tensor(a) for a in dense] for _ in range(copies)]
    s_ops = [[tvm.runtime.tensor(a) for a in sparse] for _ in range(copies)]
    for f, ops in ((fd, d_ops[0]), (fs, s_ops[0])):
        f(xt, *ops, y)
        err = np.abs(y.numpy() - x @ w.T).max() / np.abs(x @ w.T).max()
        assert err < 1e-5, f"{n}x{k} m={m}: rel err {err}"
    out = {}
    if m == 1:  # cycling through copies larger than the L3: weights come from DRAM
        out["dense_us"] = cycle_time([lambda o=o: fd(xt, *o, y) for o in d_ops], repeat) * 1e6
        out["sparse_us"] = cycle_time([lambda o=o: fs(xt, *o, y) for o in s_ops], repeat) * 1e6
    # one copy, cache-hot: each kernel's compute rate (weights per second)
    hd = median_time(lambda: fd(xt, *d_ops[0], y), repeat, inner=20 if m == 1 else 1)
    hs = median_time(lambda: fs(xt, *s_ops[0], y), repeat, inner=20 if m == 1 else 1)
    if m > 1:
        out["dense_us"], out["sparse_us"] = hd * 1e6, hs * 1e6
    out["hot_gweights_per_s"] = {"dense": n * k / hd / 1e9, "sparse": n * k / hs / 1e9}
    out["speedup"] = out["dense_us"] / out["sparse_us"]
    return out


def bench(repeat: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n, k in SHAPES:
        copies = max(2, -(-(96 << 20) // (n * k * 4)))
        for dtype in ("float32", "int8"):
            for fraction in FRACTIONS:
                w0 = _pruned(rng, n, k, fraction)
                w, (fd, dense, dbytes), (fs, sparse, sbytes) = _kernels(w0, dtype)
                row = {"n": n, "k": k, "dtype": dtype, "zeros": fraction,
                       "byte_ratio": dbytes / sbytes}
                for m in (1, 512):
                    row[f"m{m}"] = _time(fd[m], fs, dense, sparse, w, m,
                                         copies if m == 1 else 1, repeat, rng)
                row["efficiency"] = row["m1"]["speedup"] / row["byte_ratio"]
                rows.append(row)
                hot = row["m1"]["hot_gweights_per_s"]
                print(f"{n:>5}x{k:<5} {dtype:>7} {fraction:4.0%} zeros | bytes x"
                      f"{row['byte_ratio']:.2f} | decode {row['m1']['dense_us']:7.1f} -> "
                      f"{row['m1']['sparse_us']:7.1f} us x{row['m1']['speedup']:.2f} "
                      f"(efficiency {row['efficiency']:.2f}) | hot Gweights/s dense "
                      f"{hot['dense']:5.1f} sparse {hot['sparse']:5.1f} | prefill 512 "
                      f"{row['m512']['dense_us'] / 1e3:6.2f} -> "
                      f"{row['m512']['sparse_us'] / 1e3:6.2f} ms x{row['m512']['speedup']:.2f}",
                      flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--avx2", action="store_true",
                    help="compile for an AVX2 CPU (znver3, 256-bit) instead of the host")
    args = ap.parse_args(argv)
    global TARGET
    from kiln.codegen.targets import cpu, host_cpu

    TARGET = cpu("znver3", vector_bits=256) if args.avx2 else host_cpu()
    print(f"target: {TARGET.tvm_dict()}, {TARGET.vector_bits}-bit vectors", flush=True)
    rows = bench(args.repeat)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
