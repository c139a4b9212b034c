"""Prefill GEMMs alone on the GPU: the wgmma kernel (fp16, bf16) against kiln's WMMA tiles and
dlight's schedule, Llama-3.2-1B shapes at 2048 rows (issue 13 item 1, issue 12's 1.15x).

    python benchmarks/gpu/gemm_bench.py build .device/gemm        # here: sm_90a machine code
    python3 benchmarks/gpu/gemm_bench.py run .device/gemm         # on the GPU host

`run` checks every kernel's output against float32 numpy on 128 sampled rows (and a 300-row
case whose last block is partial) before timing it (TVM's time_evaluator, median of repeats),
and prints TFLOP/s per kernel and shape with the ratio to dlight's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROWS = 2048
#: name -> (n, k, out_dtype, residual): the 1B shape's prefill GEMMs
SHAPES = {"qkv": (3072, 2048, "float16", False), "o": (2048, 2048, "float16", True),
          "gate_up": (16384, 2048, "float16", False), "down": (2048, 8192, "float16", True),
          "lm_head": (128256, 2048, "float32", False)}
#: kernel name -> how to build it
KERNELS = {"dlight": ("dlight", {}),
           "wmma_128x128x64_2x4_s3": ("wmma", dict(bm=128, bn=128, bk=64, wm=2, wn=4,
                                                   stages=3)),
           "wmma_bf16_128x128x64_2x4_s3": ("wmma_bf16", dict(bm=128, bn=128, bk=64, wm=2, wn=4,
                                                             stages=3)),
           "wgmma_bn128_s3": ("wgmma", dict(bn=128, stages=3)),
           "wgmma_bn128_s4": ("wgmma", dict(bn=128, stages=4)),
           "wgmma_bn256_s3": ("wgmma", dict(bn=256, stages=3)),
           "wgmma_bn128_s4_if1": ("wgmma", dict(bn=128, stages=4, inflight=1)),
           "wgmma_bn256_s4_if1": ("wgmma", dict(bn=256, stages=4, inflight=1)),
           "wgmma_bn256_s4_if1_staged": ("wgmma", dict(bn=256, stages=4, inflight=1,
                                                        staged=True)),
           "wgmma_bn128_s3_staged": ("wgmma", dict(bn=128, stages=3, staged=True)),
           "wgmma_bf16_bn128_s3": ("wgmma_bf16", dict(bn=128, stages=3)),
           "wgmma_bf16_bn256_s4_if1": ("wgmma_bf16", dict(bn=256, stages=4, inflight=1))}
EDGE = ("edge", 300, 256, 512, "float16", True)  # a partial last block of rows


def make(kind: str, n: int, k: int, out: str, residual: bool, cfg: dict):
    from kiln.codegen.cuda.kernels import gemm, wgmma_gemm

    if kind == "dlight":
        return gemm.dlight_kernel(n, k, "float16", out, residual=residual)
    if kind in ("wmma", "wmma_bf16"):
        dt = "bfloat16" if kind == "wmma_bf16" else "float16"
        out = dt if out == "float16" else out
        return gemm.gemm_kernel(n, k, dt, out, residual=residual, **cfg)
    dt = "bfloat16" if kind == "wgmma_bf16" else "float16"
    out = dt if out == "float16" else out
    return wgmma_gemm.wgmma_gemm_kernel(n, k, dt, out, residual=residual, **cfg)


def build(out: Path) -> None:
    import tvm

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import pdl, wgmma_gemm

    ct.ensure_cuda_codegen()
    funcs, cases = {}, []
    for shape, (n, k, dt, res) in SHAPES.items():
        for name, (kind, cfg) in KERNELS.items():
            if kind.startswith("wgmma") and not wgmma_gemm.supported(n, k, "float16",
                                                                     cfg["bn"]):
                continue
            fn = f"{shape}__{name}"
            funcs[fn] = make(kind, n, k, dt, res, cfg).with_attr("global_symbol", fn)
            bf16 = kind.endswith("bf16")
            cases.append({"func": fn, "shape": shape, "kernel": name, "m": ROWS, "n": n,
                          "k": k, "out": "bfloat16" if bf16 and dt == "float16" else dt,
                          "residual": res, "dtype": "bfloat16" if bf16 else "float16"})
    _, m, n, k, dt, res = EDGE
    for name, (kind, cfg) in KERNELS.items():
        if kind.startswith("wgmma"):
            fn = f"edge__{name}"
            funcs[fn] = make(kind, n, k, dt, res, cfg).with_attr("global_symbol", fn)
            bf16 = kind.endswith("bf16")
            cases.append({"func": fn, "shape": "edge", "kernel": name, "m": m, "n": n, "k": k,
                          "out": "bfloat16" if bf16 else dt, "residual": res,
                          "dtype": "bfloat16" if bf16 else "float16"})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host={"kind": "llvm"})
    with ct.cuda_compile_env(target), ct.async_copies():
        lib = tvm.tirx.build(tvm.IRModule(funcs), target, pipeline=pdl.PIPELINE)
    out.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out / "gemms.so"))
    ct.require_fatbin(out / "gemms.so")
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(funcs)} kernels -> {out / 'gemms.so'}")


def run(out: Path, bundle: Path, repeat: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cuda_llm import enter_bundle

    enter_bundle(bundle)
    from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

    tvm = import_tvm()
    load_cuda_runtime(tvm)
    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(out / "gemms.so"))
    cases = json.loads((out / "cases.json").read_text())
    rng = np.random.default_rng(0)
    inputs, rows = {}, {}
    results = []
    import ml_dtypes

    def typed(a, dtype):
        return a.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)

    for c in cases:
        key = (c["m"], c["n"], c["k"], c["out"], c["residual"], c["dtype"])
        if key not in inputs:
            m, n, k = c["m"], c["n"], c["k"]
            x = typed(rng.standard_normal((m, k)) * 0.5, c["dtype"])
            w = typed(rng.standard_normal((n, k)) * k ** -0.5, c["dtype"])
            r = typed(rng.standard_normal((m, n)), c["out"]) if c["residual"] else None
            sample = np.unique(np.concatenate([rng.integers(0, m, 126), [0, m - 1]]))
            want = x[sample].astype(np.float32) @ w.astype(np.float32).T
            if r is not None:
                want = want + r[sample].astype(np.float32)
            args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)]
            args += [tvm.runtime.tensor(r, dev)] if r is not None else []
            args.append(tvm.runtime.empty((m, n), c["out"], dev))
            inputs[key], rows[key] = (args, want), sample
        args, want = inputs[key]
        args[-1].copyfrom(typed(np.full((c["m"], c["n"]), np.nan), c["out"]))
        lib[c["func"]](*args)
        got = args[-1].numpy()[rows[key]].astype(np.float32)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        ok = bool(np.isfinite(got).all() and err < (2e-2 if c["dtype"] == "bfloat16" else 5e-3))
        sec = None
        if ok and c["shape"] != "edge":
            f = lib.time_evaluator(c["func"], dev, number=1, repeat=repeat, min_repeat_ms=30)
            sec = float(np.median(f(*args).results))
        results.append({**c, "rel_err": err, "ok": ok, "seconds": sec})
        tf = 2 * c["m"] * c["n"] * c["k"] / sec / 1e12 if sec else float("nan")
        print(f"{c['shape']:8s} {c['kernel']:24s} rel err {err:.2e} {'ok ' if ok else 'BAD'}"
              + (f" {sec * 1e6:9.1f} us {tf:6.1f} TFLOP/s" if sec else ""), flush=True)
    print("\nshape     kernel                   TFLOP/s  vs dlight")
    for shape in SHAPES:
        base = next((r["seconds"] for r in results if r["shape"] == shape
                     and r["kernel"] == "dlight"), None)
        for r in (r for r in results if r["shape"] == shape and r["seconds"]):
            tf = 2 * r["m"] * r["n"] * r["k"] / r["seconds"] / 1e12
            print(f"{shape:9s} {r['kernel']:24s} {tf:7.1f}  "
                  f"{base / r['seconds'] if base else float('nan'):.2f}x")
    (out / "results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("build", "run"))
    p.add_argument("out", type=Path)
    p.add_argument("--bundle", type=Path, help="a kiln bundle (runtime-only TVM) for `run`")
    p.add_argument("--repeat", type=int, default=20)
    a = p.parse_args()
    if a.command == "build":
        build(a.out)
    else:
        run(a.out, a.bundle, a.repeat)


if __name__ == "__main__":
    main()
