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


def cycle_time(fns: list[Callable[[], object]], repeat: int) -> float:
    """Median seconds per call over back-to-back calls on distinct weight copies (more bytes than
    the L3), so weights come from DRAM as in decode, where each weight is read once per token."""
    for f in fns:
        f()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for f in fns:
            f()
        times.append((time.perf_counter() - t0) / len(fns))
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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(model.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"]), onnx


def bench_linear(threads: int, repeat: int, bandwidth: float) -> None:
    from kiln.codegen.kernels import linear as lin
    from kiln.codegen.kernels import packed_linear as plin
    from kiln.codegen.targets import host_cpu

    target = host_cpu(threads)
    rng = np.random.default_rng(0)
    print(f"\nlinear y = x @ W^T (W [N, K] fp32; pMRxNV: packed [N/16, K, 16]), {threads} "
          f"threads, median of {repeat}; M=1 cycles through weight copies > L3 (DRAM-cold); "
          f"roofline {bandwidth:.1f} GB/s")
    print(f"{'N x K':>12} {'M':>4} {'cfg':>10} | {'kiln':>17} | {'numpy':>17} | "
          f"{'onnxruntime':>17} | {'kiln %bw':>8}")
    for n, k in LINEAR_SHAPES:
        copies = max(1, min(48, -(-(80 << 20) // (n * k * 4))))
        ws = [rng.standard_normal((n, k), dtype=np.float32) for _ in range(copies)]
        sessions = [_ort_matmul(w, threads)[0] for w in ws]
        for m, cfg in ((1, plin.DECODE), (1, lin.DECODE), (128, plin.PREFILL),
                       (512, plin.PREFILL), (512, lin.PREFILL)):
            if n > 20000 and m > 128:
                continue  # the LM head runs on the last position only in a generation loop
            x = rng.standard_normal((m, k), dtype=np.float32)
            times = _time_linear(target, cfg, x, ws if m == 1 else ws[:1],
                                 sessions if m == 1 else sessions[:1], repeat)
            cells = [_cell(t, m, n, k) for t in times.values()]
            bw = n * k * 4 / times["kiln"] / 1e9
            tag = _tag(cfg)
            hot = "  (copies fit the L3: cache-hot)" if m == 1 and copies * n * k * 4 < (
                48 << 20) else ""
            print(f"{n:>6} x{k:>5} {m:>4} {tag:>10} | " + " | ".join(cells) +
                  (f" | {100 * bw / bandwidth:>7.0f}%{hot}" if m == 1 else " |"))


def _tag(cfg) -> str:
    if hasattr(cfg, "nv"):  # packed weights [N/16, K, 16]
        return f"p{cfg.mr}x{cfg.nv}"
    return f"{cfg.mr}x{cfg.nr}" + (f"/{cfg.mb}x{cfg.nb}" if cfg.mb else "")


def _time_linear(target, cfg, x: np.ndarray, ws: list[np.ndarray], sessions: list,
                 repeat: int) -> dict[str, float]:
    """Median seconds per call of kiln's kernel, numpy and onnxruntime (checked first)."""
    import tvm

    from kiln.codegen.kernels import linear as lin
    from kiln.codegen.kernels import packed_linear as plin

    (m, k), n = x.shape, ws[0].shape[0]
    packed = isinstance(cfg, plin.PackedConfig)
    f = (plin.packed_linear_kernel(n, k, cfg) if packed else
         lin.linear_kernel(n, k, cfg, lanes=target.lanes(4)))
    lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                      target=target.tvm_target())
    xt, yt = tvm.runtime.tensor(x), tvm.runtime.tensor(np.empty((m, n), np.float32))
    wts = [tvm.runtime.tensor(plin.pack(w, 16) if packed else w) for w in ws]
    lib["main"](xt, wts[0], yt)
    ref = x @ ws[0].T
    err = np.abs(yt.numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-5, f"linear {n}x{k} m={m}: rel err {err}"
    kernel = lib["main"]
    return {"kiln": cycle_time([lambda w=w: kernel(xt, w, yt) for w in wts], repeat),
            "numpy": cycle_time([lambda w=w: x @ w.T for w in ws], repeat),
            "ort": cycle_time([lambda s=s: s.run(None, {"x": x}) for s in sessions], repeat)}


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


def bench_vs_onnxruntime(threads: int, repeat: int, prompt: int, steps: int) -> None:
    """Side by side on one ONNX model: the synthetic SmolLM2-135M (seeded weights) run by
    onnxruntime (its KV cache concatenated each step) and compiled by kiln."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    import tvm

    from kiln.codegen.build import build_module, compile_module
    from kiln.codegen.targets import host_cpu
    from kiln.compiler.compile import compile_graph
    from kiln.models.synthetic import write_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    write_synthetic("smollm2-135m", tmp, seed=0, weights=True)
    model = tmp / "model.onnx"
    graph = compile_graph(model, max_seq=prompt + steps + 1, progress=lambda m: None,
                          weights_optional=False)
    t0 = time.perf_counter()
    mod, sig = build_module(graph, host_cpu(threads))
    vm = tvm.runtime.vm.VirtualMachine(compile_module(mod, host_cpu(threads)), tvm.cpu())
    size = (model.stat().st_size + (tmp / "model.onnx.data").stat().st_size) >> 20
    print(f"\nsynthetic SmolLM2-135M ONNX ({size} MB), seeded weights: kiln build+compile "
          f"{time.perf_counter() - t0:.1f}s")
    ids = np.random.default_rng(0).integers(0, 49152, (1, prompt + steps))
    kiln_pre, kiln_dec, kiln_logits = _run_kiln(vm, sig, graph, ids, prompt, steps, repeat)
    del vm
    # onnxruntime second: its idle worker threads spin and would slow whatever runs next
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    ort_pre, ort_dec, ort_logits = _run_ort(sess, ids, prompt, steps, repeat)
    err = np.abs(kiln_logits - ort_logits).max() / np.abs(ort_logits).max()
    print(f"{'':>12} {'prefill ' + str(prompt):>16} {'decode':>14}   (last-step logits rel err "
          f"kiln vs ort {err:.1e})")
    for name, pre, dec in (("onnxruntime", ort_pre, ort_dec), ("kiln", kiln_pre, kiln_dec)):
        print(f"{name:>12} {prompt / pre:>10.0f} tok/s {1 / dec:>8.1f} tok/s")
    print(f"{'kiln / ort':>12} {ort_pre / kiln_pre:>10.2f}x       {ort_dec / kiln_dec:>8.2f}x")


def _run_ort(sess, ids: np.ndarray, prompt: int, steps: int, repeat: int):
    names = [i.name for i in sess.get_inputs()]
    kv = [n for n in names if n.startswith("past_key_values")]
    shape = next(i.shape for i in sess.get_inputs() if i.name == kv[0])

    def feeds(tok: np.ndarray, past: int, cache: list | None) -> dict:
        f = {"input_ids": tok, "attention_mask": np.ones((1, past + tok.shape[1]), np.int64),
             "position_ids": np.arange(past, past + tok.shape[1])[None]}
        for j, n in enumerate(kv):
            f[n] = cache[j] if cache else np.zeros((1, shape[1], 0, shape[3]), np.float32)
        return {k: v for k, v in f.items() if k in names}

    t_pre = median_time(lambda: sess.run(None, feeds(ids[:, :prompt], 0, None)), repeat)
    out = sess.run(None, feeds(ids[:, :prompt], 0, None))
    times = []
    for step in range(steps):
        p = prompt + step
        t = time.perf_counter()
        out = sess.run(None, feeds(ids[:, p:p + 1], p, out[1:]))
        times.append(time.perf_counter() - t)
    return t_pre, statistics.median(times[1:]), out[0][:, -1]


def _run_kiln(vm, sig, graph, ids: np.ndarray, prompt: int, steps: int,
              repeat: int):
    import tvm

    params = tuple(tvm.runtime.tensor(np.ascontiguousarray(graph.params[p].load()))
                   for p in sig.params)
    caches = tuple(tvm.runtime.tensor(np.zeros((1, c.kv_heads, prompt + steps, c.head_dim),
                                               np.float32)) for c in sig.caches)

    def call(entry: str, tok: np.ndarray, past: int):
        f = {"input_ids": tok, "attention_mask": np.ones((1, past + tok.shape[1]), np.int64),
             "position_ids": np.arange(past, past + tok.shape[1])[None]}
        args = [tvm.runtime.tensor(np.ascontiguousarray(f[v])) for v in sig.inputs]
        return vm[entry](tvm.runtime.ShapeTuple([past]), *args, caches, params)

    t_pre = median_time(lambda: call("prefill", ids[:, :prompt], 0), repeat)
    call("prefill", ids[:, :prompt], 0)
    times = []
    for step in range(steps):
        p = prompt + step
        t = time.perf_counter()
        out = call("decode", ids[:, p:p + 1], p).numpy()
        times.append(time.perf_counter() - t)
    return t_pre, statistics.median(times[1:]), out[:, -1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", action="store_true", help="only the linear kernel table")
    ap.add_argument("--model", action="store_true", help="only the whole-model run")
    ap.add_argument("--vs-ort", action="store_true",
                    help="only kiln vs onnxruntime on the synthetic SmolLM2 ONNX model")
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    bw = measure_bandwidth(args.threads, args.repeat)
    print("memory read bandwidth (numpy sum, 256 MB): " +
          ", ".join(f"{k} {v:.1f} GB/s" for k, v in bw.items()))
    roof = max(bw.values())
    if args.vs_ort:
        bench_vs_onnxruntime(args.threads, args.repeat, args.prompt, args.steps)
        return
    if not args.model:
        bench_linear(args.threads, args.repeat, roof)
    if not args.kernels:
        bench_model(args.threads, args.repeat, roof, args.prompt, args.steps)


if __name__ == "__main__":
    sys.exit(main())
