"""Decode GEMV (m = 1) of kiln's quantized linear kernels against the memory roofline of its bytes.

For each SmolLM2-135M decode shape and scheme the kernel runs over enough copies of its weights
(> 256 MB together, so every call reads DRAM rather than cache), and its bytes (codes, scales,
zero points) per call over the call's time is compared with the bandwidth measured in the same
run (numpy sum of a 256 MB array split over the threads), the two alternated, medians of rounds:

    python benchmarks/quant_gemv.py [--rounds 5] [--threads 2]

Prints one row per (scheme, shape): GB/s of the kernel, of the reference read, and the fraction.
`w4g32-a8` is the int8-activation GEMV (AVX-512 VNNI where the host has it).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: (name, N, K) of SmolLM2-135M's decode linears after fusion (q/k/v, gate/up fused)
SHAPES = [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("head", 49152, 576)]
#: (name, bits, group (0: per channel), zero points, activation bits): w4g32-a8 runs the VNNI
#: GEMV (int8 activations) where the host has AVX-512 VNNI and VBMI, else its float fallback
SCHEMES = [("w4g32", 4, 32, True, 0), ("w4g32-a8", 4, 32, True, 8), ("w8", 8, 0, False, 0)]
WORKING_SET = 256 << 20


def sweep(f, x, y, copies: list, per_call: int) -> float:
    """GB/s of one call on each copy of the operands, in turn."""
    t0 = time.perf_counter()
    for ops in copies:
        f(x, *ops, y)
    return per_call * len(copies) / (time.perf_counter() - t0) / 1e9


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("TVM_NUM_THREADS", str(args.threads))
    import tvm

    from kiln.codegen.cpu_spaces import QUANT_GEMV_NV as GEMV_NV
    from kiln.codegen.kernels import quant_linear as ql
    from kiln.codegen.kernels.packed_linear import PREFILL as GEMM
    from kiln.codegen.targets import host_cpu
    from kiln.runtime import quant_format as qf

    rng = np.random.default_rng(0)
    big = np.ones(WORKING_SET // 4, np.float32)
    parts = np.array_split(big, args.threads)
    pool = ThreadPoolExecutor(args.threads)

    def bandwidth() -> float:
        t0 = time.perf_counter()
        list(pool.map(np.sum, parts))
        return big.nbytes / (time.perf_counter() - t0) / 1e9

    print("| scheme | linear | N x K | bytes/call | kernel GB/s | read GB/s | fraction |")
    print("|---|---|---|---|---|---|---|")
    for sname, bits, group, zps, act in SCHEMES:
        for lname, n, k in SHAPES:
            if sname == "w8" and lname not in ("qkv", "head"):
                continue  # the int8 weights of w4g32; w8's others read as these do
            w = rng.standard_normal((n, k), dtype=np.float32)
            q, s, z = qf.quantize_codes(w, bits=bits, group=group, symmetric=not zps)
            ops = [qf.blocked(qf.pack_codes(q, bits)), qf.blocked(s)]
            if zps:
                ops.append(qf.blocked(z))
            per_call = sum(a.nbytes for a in ops)
            copies = max(1, WORKING_SET // per_call)
            scheme = ql.QuantScheme(n, k, bits, group or k, zero_points=zps, act_bits=act)
            func = ql.quant_linear_kernel(scheme, GEMM, GEMV_NV[bits], bias=False,
                                          vnni=host_cpu().vnni)
            mod = tvm.IRModule({"f": func.with_attr("global_symbol", "f")})
            f = tvm.compile(mod, target=host_cpu().tvm_target())["f"]
            dev = [[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in ops]
                   for _ in range(copies)]
            x = tvm.runtime.tensor(rng.standard_normal((1, k), dtype=np.float32))
            y = tvm.runtime.tensor(np.zeros((1, n), np.float32))

            sweep(f, x, y, dev, per_call)
            kern, read = [], []
            for _ in range(args.rounds):  # alternated: the load changes from second to second
                kern.append(sweep(f, x, y, dev, per_call))
                read.append(bandwidth())
            km, rm = statistics.median(kern), statistics.median(read)
            print(f"| {sname} | {lname} | {n} x {k} | {per_call / 1e6:.2f} MB | {km:.1f} "
                  f"({min(kern):.1f}-{max(kern):.1f}) | {rm:.1f} | {km / rm:.0%} |", flush=True)
            del dev
            print(f"<!-- {lname} {sname}: {copies} copies -->", file=sys.stderr)
    pool.shutdown()


if __name__ == "__main__":
    sys.exit(main())
