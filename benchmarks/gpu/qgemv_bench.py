"""Quantized decode GEMVs alone on the GPU: int4 and int8 codes unpacked to float32 (`f32`) or
two at a time to half2 (`f16x2`), beside the fp16 GEMV of the same shape; Llama-3.2-1B decode
shapes with their fused epilogues (issue 13 item 2: int4/int8 decode at the packed bytes'
bandwidth).

    python benchmarks/gpu/qgemv_bench.py build .device/qgemv      # here: sm_90a machine code
    python3 benchmarks/gpu/qgemv_bench.py run .device/qgemv --bundle B   # on the GPU host

`run` checks each kernel against the format's numpy dequantization (float64 products) before
timing it, then times it twice with TVM's time_evaluator (median of repeats): L2-hot (the same
weights again) and with 256 MB written between runs (`cache_flush_bytes`, so every byte
comes from HBM, as in a decode step, where each weight is read once). Prints us, GB/s of the
bytes read and the ratio to the fp16 GEMV of the shape.
"""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np

EPS = 1e-5
#: name -> (n, k, epilogue, out dtype): the 1B shape's decode GEMVs as kiln lowers them
SHAPES = {"qkv": (3072, 2048, "norm", "float16"), "o": (2048, 2048, "residual", "float16"),
          "gate_up": (16384, 2048, "norm", "float16"),
          "down": (2048, 8192, "residual", "float16"),
          "lm_head": (128256, 2048, "norm", "float32")}
#: variant -> (bits, group, zero points); the fp16 GEMV is "fp16"
QUANTS = {"w4g128s": (4, 128, False), "w4g32": (4, 32, True), "w8": (8, 0, False)}
MATHS = ("f32", "f16x2")
FLUSH = 256 << 20


def build(out: Path) -> None:
    import tvm

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import gemv, pdl, quant_gemv

    ct.ensure_cuda_codegen()
    funcs, cases = {}, []
    for shape, (n, k, epi, out_dt) in SHAPES.items():
        kw = {"residual": epi == "residual", "norm_eps": EPS if epi == "norm" else None}
        funcs[f"{shape}__fp16"] = gemv.gemv_kernel(n, k, "float16", out_dt, **kw)
        cases.append({"func": f"{shape}__fp16", "shape": shape, "variant": "fp16", "n": n,
                      "k": k, "epilogue": epi, "out": out_dt})
        for q, (bits, group, zp) in QUANTS.items():
            for math in MATHS:
                fn = f"{shape}__{q}_{math}"
                funcs[fn] = quant_gemv.quant_gemv_kernel(
                    n, k, bits, group or k, "float16", out_dt, zero_points=zp, math=math, **kw)
                cases.append({"func": fn, "shape": shape, "variant": f"{q} {math}", "n": n,
                              "k": k, "epilogue": epi, "out": out_dt, "bits": bits,
                              "group": group or k, "zero_points": zp})
    funcs = {name: f.with_attr("global_symbol", name) for name, f in funcs.items()}
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90a"}, host={"kind": "llvm"})
    with ct.cuda_compile_env(target):
        lib = tvm.tirx.build(tvm.IRModule(funcs), target, pipeline=pdl.PIPELINE)
    out.mkdir(parents=True, exist_ok=True)
    lib.export_library(str(out / "qgemv.so"))
    ct.require_fatbin(out / "qgemv.so")
    (out / "cases.json").write_text(json.dumps(cases, indent=1))
    print(f"{len(funcs)} kernels -> {out / 'qgemv.so'}")


def _inputs(c: dict, rng: np.random.Generator):
    """(arguments as numpy, bytes the kernel reads, the float64 reference)."""
    from kiln.runtime import quant_format as qf

    n, k = c["n"], c["k"]
    x = (rng.standard_normal((1, k)) * 2).astype(np.float16)
    w = rng.standard_normal((n, k)) * k ** -0.5
    args, read = [x], x.nbytes
    xr = x.astype(np.float64)
    if c["epilogue"] == "norm":
        gamma = (1 + 0.2 * rng.standard_normal(k)).astype(np.float16)
        args.append(gamma)
        read += gamma.nbytes
        xr = xr / np.sqrt(np.mean(xr ** 2) + EPS) * gamma.astype(np.float64)
    if c["variant"] == "fp16":
        wq = w.astype(np.float16)
        args.append(wq)
        wr = wq.astype(np.float64)
    else:
        q, s, z = qf.quantize_rtn(w.astype(np.float32), bits=c["bits"], group=c["group"],
                                  symmetric=not c["zero_points"])
        s = s.astype(np.float16)
        z = None if z is None else z.astype(np.float16)
        args += [q, s] + ([z] if z is not None else [])
        wr = qf.dequantize(q, s.astype(np.float64), None if z is None else z.astype(np.float64),
                           bits=c["bits"], k=k)
    read += sum(a.nbytes for a in args[-3:] if a.ndim == 2 and a.shape[0] == n)
    want = xr @ wr.T
    if c["epilogue"] == "residual":
        r = rng.standard_normal((1, n)).astype(np.float16)
        args.append(r)
        want = want + r
    return args, read, want


def run(out: Path, bundle: Path, repeat: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cuda_llm import enter_bundle

    enter_bundle(bundle)
    from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

    tvm = import_tvm()
    load_cuda_runtime(tvm)
    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(out / "qgemv.so"))
    cases = json.loads((out / "cases.json").read_text())
    results = []
    for c in cases:
        args, read, want = _inputs(c, np.random.default_rng(zlib.crc32(c["shape"].encode())))
        dargs = [tvm.runtime.tensor(a, dev) for a in args]
        dargs.append(tvm.runtime.tensor(np.full((1, c["n"]), np.nan, c["out"]), dev))
        lib[c["func"]](*dargs)
        got = dargs[-1].numpy().astype(np.float64)
        err = float(np.abs(got - want).max() / np.abs(want).max())
        ok = bool(np.isfinite(got).all() and err < 3e-3)
        hot = cold = None
        if ok:
            f = lib.time_evaluator(c["func"], dev, number=20, repeat=repeat)
            hot = float(np.median(f(*dargs).results))
            f = lib.time_evaluator(c["func"], dev, number=1, repeat=repeat * 4,
                                   cache_flush_bytes=FLUSH)
            cold = float(np.median(f(*dargs).results))
        results.append({**c, "rel_err": err, "ok": ok, "hot_s": hot, "cold_s": cold,
                        "bytes": read})
        print(f"{c['shape']:8s} {c['variant']:12s} rel err {err:.2e} {'ok ' if ok else 'BAD'}"
              + (f" hot {hot * 1e6:8.1f} us  HBM {cold * 1e6:8.1f} us "
                 f"{read / cold / 1e9:7.0f} GB/s" if ok else ""), flush=True)
    print("\nshape    variant        HBM us   GB/s  vs fp16 (time)")
    for shape in SHAPES:
        base = next((r["cold_s"] for r in results if r["shape"] == shape
                     and r["variant"] == "fp16"), None)
        for r in (r for r in results if r["shape"] == shape and r["cold_s"]):
            print(f"{shape:8s} {r['variant']:12s} {r['cold_s'] * 1e6:8.1f} "
                  f"{r['bytes'] / r['cold_s'] / 1e9:6.0f}  "
                  f"{base / r['cold_s'] if base else float('nan'):.2f}x")
    (out / "results.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("build", "run"))
    p.add_argument("out", type=Path)
    p.add_argument("--bundle", type=Path, help="a kiln bundle (runtime-only TVM) for `run`")
    p.add_argument("--repeat", type=int, default=10)
    a = p.parse_args()
    if a.command == "build":
        build(a.out)
    else:
        run(a.out, a.bundle, a.repeat)


if __name__ == "__main__":
    main()
