"""CPU kernel benchmark: kiln's linear kernels vs numpy (OpenBLAS) vs onnxruntime, and a whole-model
SmolLM2-135M-shaped prefill/decode with seeded weights. Prints tables of medians.

    python benchmarks/cpu_kernels.py [--kernels] [--model] [--repeat N] [--threads T]

Bandwidth is measured in the same run (numpy sum of a 256 MB array on 1 and on T threads); the
roofline fraction of a bandwidth-bound kernel is its weight bytes / time / that bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

# thread counts must be fixed before numpy/OpenBLAS and the TVM runtime start their pools
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("TVM_NUM_THREADS", "2")

import numpy as np

LINEAR_SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)]  # (N, K)


def median_time(fn: Callable[[], object], repeat: int, *, inner: int = 1) -> float:
    fn()  # warm up (page faults, thread pools, caches)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_bandwidth(threads: int, repeat: int) -> dict[str, float]:
    """GB/s reading a 256 MB float32 array: numpy sum on 1 thread and split over `threads`."""
    a = np.ones(64 << 20, np.float32)
    parts = np.array_split(a, threads)
    pool = ThreadPoolExecutor(threads)
    one = median_time(a.sum, repeat)
    many = median_time(lambda: list(pool.map(np.sum, parts)), repeat)
    pool.shutdown()
    return {"1 thread": a.nbytes / one / 1e9, f"{threads} threads": a.nbytes / many / 1e9}


# ---------------------------------------------------------------------------------------------
# linear kernels


def _ort_matmul(w: np.ndarray, threads: int):
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k = w.shape[1]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", w.shape[0]])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]), onnx


def bench_linear(threads: int, repeat: int, bandwidth: float) -> None:
    from kiln.codegen.kernels import linear as lin
    from kiln.codegen.targets import host_cpu

    target = host_cpu(threads)
    rng = np.random.default_rng(0)
    print(f"\nlinear y = x @ W^T (W [N, K] fp32), {threads} threads, median of {repeat}; "
          f"roofline {bandwidth:.1f} GB/s")
    print(f"{'N x K':>12} {'M':>4} {'cfg':>10} | {'kiln':>17} | {'numpy':>17} | "
          f"{'onnxruntime':>17} | {'kiln %bw':>8}")
    for n, k in LINEAR_SHAPES:
        w = rng.standard_normal((n, k), dtype=np.float32)
        sess, _ = _ort_matmul(w, threads)
        for m, cfg in ((1, lin.DECODE), (512, lin.PREFILL)):
            if n > 20000 and m > 1:
                continue  # the LM head runs on the last position only in a generation loop
            x = rng.standard_normal((m, k), dtype=np.float32)
            times = _time_linear(target, cfg, x, w, sess, repeat)
            cells = [_cell(t, m, n, k) for t in times.values()]
            bw = n * k * 4 / times["kiln"] / 1e9
            tag = f"{cfg.mr}x{cfg.nr}" + (f"/{cfg.mb}x{cfg.nb}" if cfg.mb else "")
            print(f"{n:>6} x{k:>5} {m:>4} {tag:>10} | " + " | ".join(cells) +
                  f" | {100 * bw / bandwidth:>7.0f}%")


def _time_linear(target, cfg, x: np.ndarray, w: np.ndarray, sess,
                 repeat: int) -> dict[str, float]:
    """Median seconds of kiln's kernel, numpy and onnxruntime on y = x @ w.T (checked first)."""
    import tvm

    from kiln.codegen.kernels import linear as lin

    (m, k), n = x.shape, w.shape[0]
    f = lin.linear_kernel(n, k, cfg, lanes=target.lanes(4))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=target.tvm_target())
    xt, wt = tvm.runtime.tensor(x), tvm.runtime.tensor(w)
    yt = tvm.runtime.tensor(np.empty((m, n), np.float32))
    lib["main"](xt, wt, yt)
    ref = x @ w.T
    err = np.abs(yt.numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"linear {n}x{k} m={m}: rel err {err}"
    inner = 20 if m == 1 and n * k < 1e6 else 3
    return {"kiln": median_time(lambda: lib["main"](xt, wt, yt), repeat, inner=inner),
            "numpy": median_time(lambda: x @ w.T, repeat, inner=inner),
            "ort": median_time(lambda: sess.run(None, {"x": x}), repeat, inner=inner)}


def _cell(t: float, m: int, n: int, k: int) -> str:
    if m == 1:
        return f"{t * 1e6:7.0f}us {n * k * 4 / t / 1e9:5.1f}GB/s"
    return f"{t * 1e3:6.2f}ms {2 * m * n * k / t / 1e9:4.0f}GF/s"


# ---------------------------------------------------------------------------------------------
# whole model


def bench_model(threads: int, repeat: int, bandwidth: float, prompt: int, steps: int) -> None:
    import tvm

    from kiln.codegen.build import build_module, compile_module
    from kiln.codegen.targets import host_cpu
    from kiln.codegen.testing import SMOLLM2_135M, canonical_llama_graph

    cfg, target = SMOLLM2_135M, host_cpu(threads)
    graph = canonical_llama_graph(cfg, seed=0)
    t0 = time.perf_counter()
    mod, sig = build_module(graph, target)
    t1 = time.perf_counter()
    ex = compile_module(mod, target)
    t2 = time.perf_counter()
    print(f"\nSmolLM2-135M shape, seeded weights: build {t1 - t0:.1f}s + compile {t2 - t1:.1f}s")
    vm = tvm.runtime.vm.VirtualMachine(ex, tvm.cpu())
    params = tuple(tvm.runtime.tensor(graph.params[p].load()) for p in sig.params)
    cap = prompt + steps + 1
    caches = tuple(tvm.runtime.tensor(np.zeros((1, c.kv_heads, cap, c.head_dim), np.float32))
                   for c in sig.caches)
    ids = np.random.default_rng(0).integers(0, cfg.vocab, (1, prompt))

    def prefill() -> np.ndarray:
        return vm["prefill"](tvm.runtime.ShapeTuple([0]), tvm.runtime.tensor(ids),
                             tvm.runtime.tensor(np.arange(prompt)[None]),
                             tvm.runtime.tensor(np.ones((1, prompt), np.int64)), caches, params)

    t_prefill = median_time(prefill, max(1, repeat // 2))
    weight_bytes = sum(graph.params[p].nbytes for p in sig.params
                       if not p.startswith("rope_"))
    decode_times = []
    for step in range(steps):
        pos = prompt + step
        args = (tvm.runtime.ShapeTuple([pos]), tvm.runtime.tensor(np.array([[7]])),
                tvm.runtime.tensor(np.array([[pos]])),
                tvm.runtime.tensor(np.ones((1, pos + 1), np.int64)), caches, params)
        t = time.perf_counter()
        vm["decode"](*args).numpy()
        decode_times.append(time.perf_counter() - t)
    t_decode = statistics.median(decode_times[1:])
    roof = bandwidth * 1e9 / weight_bytes
    print(f"prefill {prompt} tokens: {t_prefill * 1e3:.0f} ms = {prompt / t_prefill:.0f} tok/s "
          "(onnxruntime on this machine: about 550 tok/s)")
    print(f"decode after {prompt}: {t_decode * 1e3:.1f} ms = {1 / t_decode:.1f} tok/s; "
          f"weights {weight_bytes / 1e6:.0f} MB/token -> roofline {roof:.1f} tok/s at "
          f"{bandwidth:.1f} GB/s: {100 / t_decode / roof:.0f}% (onnxruntime: about 30 tok/s)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", action="store_true", help="only the linear kernel table")
    ap.add_argument("--model", action="store_true", help="only the whole-model run")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    bw = measure_bandwidth(args.threads, args.repeat)
    print("memory read bandwidth (numpy sum, 256 MB): " +
          ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    roof = max(bw.values())
    if not args.model:
        bench_linear(args.threads, args.repeat, roof)
    if not args.kernels:
        bench_model(args.threads, args.repeat, roof, args.prompt, args.steps)


if __name__ == "__main__":
    sys.exit(main())
