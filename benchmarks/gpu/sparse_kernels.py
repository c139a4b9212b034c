"""The 2:4 sparse decode GEMVs (codegen/cuda/kernels/sparse_gemv.py) alone: built here, checked
against numpy and timed beside their dense twins on the GPU host.

    python benchmarks/gpu/sparse_kernels.py build .device/spk       # here: kernels.so + cases
    python3 benchmarks/gpu/sparse_kernels.py run .device/spk BUNDLE # GPU host (a kiln bundle's
                                                                    # runtime-only TVM)

Each case runs the sparse kernel and, where one exists, the dense kernel of the same role on the
densified weight, with seeded random inputs (x ~ N(0, 1), weights ~ N(0, 1/k) pruned 2:4 by
magnitude, a few groups holding fewer than two non-zeros), against a float64 numpy reference:
relative error ||y - ref|| / ||ref||, every output element written (outputs poisoned with NaN
first). Times: median of 5 repeats of 50 back-to-back calls (time_evaluator); the `big` cases
stream 128-256 MB of weights (well past the 50 MB L2): achieved bytes per second there;
`decompress` (the prefill's scratch weight) counts the bytes read and written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

EPS = 1e-5
H, KV, D = 32, 8, 64  # the Llama-3.2-1B attention shape


def cases() -> list[dict]:
    """name, kind, shape; `pair`: the dense kernel of the same role."""
    c = [dict(name="o", kind="gemv", n=2048, k=2048, res=True),
         dict(name="down", kind="gemv", n=2048, k=8192, res=True),
         dict(name="gateup", kind="swiglu", n=16384, k=2048),
         dict(name="qkv", kind="qkv", n=(H + 2 * KV) * D, k=2048),
         dict(name="norm", kind="norm", n=3072, k=2048),
         dict(name="small", kind="gemv", n=1536, k=576, res=False, m=2),
         dict(name="big", kind="gemv", n=65536, k=2048, res=False),
         dict(name="bigswiglu", kind="swiglu", n=65536, k=2048),
         dict(name="decompress", kind="decompress", n=16384, k=2048)]
    return c


def build(root: Path) -> None:
    import tvm

    from kiln.codegen import cuda_toolchain as ct
    from kiln.codegen.cuda.kernels import gemv, pdl
    from kiln.codegen.cuda.kernels import sparse_gemv as sg

    ct.ensure_cuda_codegen()
    funcs = {}
    for c in cases():
        n, k, kind = c["n"], c["k"], c["kind"]
        if kind == "gemv":
            funcs[c["name"] + "_sparse"] = sg.sparse_gemv_kernel(n, k, "float16", "float16",
                                                                 residual=c["res"], pdl=True)
            funcs[c["name"] + "_dense"] = gemv.gemv_kernel(n, k, "float16", "float16",
                                                           residual=c["res"], pdl=True)
        elif kind == "norm":
            funcs[c["name"] + "_sparse"] = sg.sparse_gemv_kernel(n, k, "float16", "float32",
                                                                 norm_eps=EPS, pdl=True)
            funcs[c["name"] + "_dense"] = gemv.gemv_kernel(n, k, "float16", "float32",
                                                           norm_eps=EPS, pdl=True)
        elif kind == "swiglu":
            funcs[c["name"] + "_sparse"] = sg.sparse_swiglu_gemv_kernel(n // 2, k, "float16",
                                                                        EPS, pdl=True)
            funcs[c["name"] + "_dense"] = gemv.swiglu_gemv_kernel(n // 2, k, "float16", EPS,
                                                                  pdl=True)
        elif kind == "decompress":  # the prefill's scratch weight (no dense twin)
            funcs[c["name"] + "_sparse"] = sg.nm_decompress_kernel(n, k, "float16")
        else:
            funcs[c["name"] + "_sparse"] = sg.sparse_qkv_rope_gemv_kernel(H, KV, D, k, "float16",
                                                                          EPS, pdl=True)
            funcs[c["name"] + "_dense"] = gemv.qkv_rope_gemv_kernel(H, KV, D, k, "float16", EPS,
                                                                    pdl=True)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    root.mkdir(parents=True, exist_ok=True)
    with target:
        ex = ct.compile_for_cuda(mod, target, tir_pipeline=pdl.PIPELINE)
    ex.export_library(str(root / "kernels.so"))
    ct.require_fatbin(root / "kernels.so", "sm_90")
    (root / "cases.json").write_text(json.dumps(cases()))
    print(f"{len(funcs)} kernels -> {root / 'kernels.so'}")


# -- the GPU host ------------------------------------------------------------------------------

def weights(rng, n: int, k: int) -> np.ndarray:
    """A 2:4 fp16 weight (magnitude-pruned N(0, 1/k)); 1 in 16 groups keeps fewer than two."""
    w = (rng.standard_normal((n, k)) / np.sqrt(k)).reshape(n, k // 4, 4)
    order = np.argsort(np.abs(w), axis=-1)
    np.put_along_axis(w, order[..., :2], 0.0, axis=-1)
    thin = rng.random((n, k // 4)) < 1 / 16
    w[thin] = np.where(np.arange(4) == 0, w[thin], 0.0)
    return w.reshape(n, k).astype(np.float16)


def rms(x: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * gamma.astype(np.float64)


def rope(v: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = v.shape[-1] // 2
    rot = np.concatenate([-v[..., half:], v[..., :half]], -1)
    return v * cos + rot * sin


def run(root: Path, bundle: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from cuda_llm import enter_bundle

    enter_bundle(bundle)
    from kiln.runtime.sparse_format import nm_encode
    from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

    tvm = import_tvm()
    load_cuda_runtime(tvm)
    lib = tvm.runtime.load_module(str(root / "kernels.so"))
    dev = tvm.cuda(0)
    rng = np.random.default_rng(11)
    rows = []

    def dev_t(a):
        return tvm.runtime.tensor(np.ascontiguousarray(a), dev)

    for c in json.loads((root / "cases.json").read_text()):
        n, k, kind, m = c["n"], c["k"], c["kind"], c.get("m", 1)
        w = weights(rng, n, k)
        values, meta = nm_encode(w)
        x = rng.standard_normal((m, k)).astype(np.float16)
        gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float16)
        w64 = w.astype(np.float64)
        outs, ref = {}, None
        if kind == "gemv":
            res = rng.standard_normal((m, n)).astype(np.float16)
            ref = x.astype(np.float64) @ w64.T + (res if c["res"] else 0)
            extra = [res] if c["res"] else []
            args = {"sparse": [x, values, meta, *extra], "dense": [x, w, *extra]}
            out_shape, out_dtype = (m, n), np.float16
        elif kind == "norm":
            ref = rms(x, gamma) @ w64.T
            args = {"sparse": [x, gamma, values, meta], "dense": [x, gamma, w]}
            out_shape, out_dtype = (m, n), np.float32
        elif kind == "decompress":
            ref = w64
            args = {"sparse": [values, meta]}
            out_shape, out_dtype = (n, k), np.float16
        elif kind == "swiglu":
            f = n // 2
            gu = rms(x, gamma) @ w64.T
            ref = gu[:, :f] / (1 + np.exp(-gu[:, :f])) * gu[:, f:]
            args = {"sparse": [x, gamma, values, meta], "dense": [x, gamma, w]}
            out_shape, out_dtype = (m, f), np.float16
        else:
            cap, past = 16, 5
            ang = rng.uniform(-3, 3, D // 2)
            cos = np.tile(np.cos(ang), 2).reshape(1, 1, D).astype(np.float16)
            sin = np.tile(np.sin(ang), 2).reshape(1, 1, D).astype(np.float16)
            qkv = rms(x, gamma) @ w64.T
            q = rope(qkv[:, :H * D].reshape(m, H, D), cos[0, 0], sin[0, 0]).reshape(m, H * D)
            kk = rope(qkv[:, H * D:(H + KV) * D].reshape(m, KV, D), cos[0, 0], sin[0, 0])
            vv = qkv[:, (H + KV) * D:].reshape(m, KV, D)
            ref = np.concatenate([q.reshape(-1), kk.reshape(-1), vv.reshape(-1)])
            for name, wargs in (("sparse", [values, meta]), ("dense", [w])):
                kc = dev_t(np.full((m, KV, cap, D), np.nan, np.float16))
                vc = dev_t(np.full((m, KV, cap, D), np.nan, np.float16))
                qo = dev_t(np.full((m, H * D), np.nan, np.float16))
                targs = [dev_t(x), dev_t(gamma), *map(dev_t, wargs), dev_t(cos), dev_t(sin), kc,
                         vc, dev_t(np.array([past], np.int32)), qo]
                lib[f"{c['name']}_{name}"](*targs)
                kcn, vcn = kc.numpy(), vc.numpy()
                untouched = np.isnan(np.delete(kcn, past, axis=2)).all() and np.isnan(
                    np.delete(vcn, past, axis=2)).all()
                got = np.concatenate([qo.numpy().reshape(-1), kcn[:, :, past].reshape(-1),
                                      vcn[:, :, past].reshape(-1)]).astype(np.float64)
                outs[name] = (got, untouched, targs)
        if kind != "qkv":
            for name, a in args.items():
                y = dev_t(np.full(out_shape, np.nan, out_dtype))
                targs = [*map(dev_t, a), y]
                lib[f"{c['name']}_{name}"](*targs)
                outs[name] = (y.numpy().astype(np.float64), True, targs)
        for name, (got, untouched, targs) in outs.items():
            err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            nan = bool(np.isnan(got).any())
            timer = lib.time_evaluator(f"{c['name']}_{name}", dev, number=50, repeat=5)
            sec = float(np.median(timer(*targs).results))
            wbytes = w.nbytes if name == "dense" else values.nbytes + meta.nbytes
            if kind == "decompress":  # the dense weight written too
                wbytes += w.nbytes
            rows.append((c["name"], name, n, k, err, nan, untouched, sec, wbytes))
    print("case | kernel | n x k | rel err vs float64 | NaN left | caches untouched | us | "
          "weight GB/s")
    for name, kern, n, k, err, nan, untouched, sec, wbytes in rows:
        print(f"{name} | {kern} | {n}x{k} | {err:.2e} | {nan} | {untouched} | {sec * 1e6:.2f} | "
              f"{wbytes / sec / 1e9:.0f}")
    dense = {r[0]: r[7] for r in rows if r[1] == "dense"}
    for r in rows:
        if r[1] == "sparse" and r[0] in dense:
            print(f"{r[0]}: sparse / dense speed {dense[r[0]] / r[7]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["build", "run"])
    p.add_argument("root", type=Path)
    p.add_argument("bundle", type=Path, nargs="?")
    a = p.parse_args()
    if a.mode == "build":
        build(a.root)
    else:
        run(a.root, a.bundle)


if __name__ == "__main__":
    main()
