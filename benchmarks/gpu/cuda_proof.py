"""CUDA toolchain proof: cross-compile a matmul+relu module here (no GPU), bundle it with
`kiln package`, then load and run it on a GPU host from the bundle alone (runtime-only TVM).

    python benchmarks/gpu/cuda_proof.py build .device     # here: .device/bundle, .device/*.fatbin
    python3 benchmarks/gpu/cuda_proof.py check .device/bundle   # on the GPU host

`check` prints each entry's relative error against float64 numpy, the large matmul's time
(median of batches of back-to-back calls, synchronized), and device-to-device copy bandwidth
through the TVM runtime and through torch (bytes read plus written), then a summary table.
torch runs in a child process: the bundle keeps torch out of its own (as on a host without it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: entry -> (M, K, N): a small one for correctness, a large one (fills the chip) for timing
SHAPES = {"mm_small": (128, 256, 64), "mm_large": (4096, 1024, 1024)}


# -- here: build --------------------------------------------------------------------------------

def proof_module():
    """relu(x @ w) for each shape in SHAPES, one Relax function per entry."""
    import tvm
    from tvm import relax

    bb = relax.BlockBuilder()
    for name, (m, k, n) in SHAPES.items():
        x = relax.Var("x", relax.TensorType((m, k), "float32"))
        w = relax.Var("w", relax.TensorType((k, n), "float32"))
        with bb.function(name, [x, w]):
            with bb.dataflow():
                y = bb.emit_output(relax.op.nn.relu(relax.op.matmul(x, w)))
            bb.emit_func_output(y)
    mod = bb.get()
    assert isinstance(mod, tvm.IRModule)
    return mod


def build(out: Path) -> None:
    from kiln.codegen import cuda_toolchain as ct

    ct.ensure_cuda_codegen()
    from tvm.target import Target

    from kiln.compiler.package import package
    from kiln.runtime import artifact as af

    target = Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})
    with af.ArtifactWriter(out / "artifact") as w:
        ct.compile_for_cuda(proof_module(), target).export_library(str(w.path(af.KERNELS)))
        w.add(af.KERNELS)
        art = w.commit({"target": {"name": "cuda", "kind": "cuda", "arch": "sm_90"},
                        "params": [], "kv_cache": {"capacity": 0}})
    ct.require_fatbin(art / af.KERNELS, "sm_90")
    data = (art / af.KERNELS).read_bytes()
    start = data.find(ct.FATBIN_MAGIC)
    header, size = int.from_bytes(data[start + 6:start + 8], "little"), int.from_bytes(
        data[start + 8:start + 16], "little")
    (out / "kernels.fatbin").write_bytes(data[start:start + header + size])
    bundle = package(art, out / "bundle", python="3.12")
    print(f"fatbin entries: {ct.fatbin_entries(art / af.KERNELS)}")
    for part, n in bundle.sizes.items():
        print(f"{part:24s} {n / 1e6:7.2f} MB")
    print(f"{'total':24s} {bundle.total / 1e6:7.2f} MB  ({bundle.path})")


# -- the GPU host: check ------------------------------------------------------------------------

def enter_bundle(bundle: Path) -> None:
    """Route imports into the bundle exactly as its launcher does."""
    spec = importlib.util.spec_from_file_location("kiln_run", bundle / "kiln_run.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.setup()


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    assert not np.isnan(out).any(), "NaN in the output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def time_entry(vm, name: str, args, dev, calls: int = 20, batches: int = 7) -> float:
    """Median seconds per call over batches of `calls` back-to-back calls."""
    for _ in range(3):
        vm[name](*args)
    dev.sync()
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(calls):
            vm[name](*args)
        dev.sync()
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def torch_numbers(mbytes: int = 1024) -> dict[str, float]:
    """torch's device copy bandwidth (read + write) and fp32 matmul time, by CUDA events."""
    import torch

    def median_ms(fn, reps: int = 20) -> float:
        for _ in range(3):
            fn()
        ms = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            ms.append(s.elapsed_time(e))
        return statistics.median(ms)

    a = torch.randn(mbytes * (1 << 20) // 4, device="cuda")
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a))
    m, k, n = SHAPES["mm_large"]
    torch.backends.cuda.matmul.allow_tf32 = False
    x, w = torch.randn(m, k, device="cuda"), torch.randn(k, n, device="cuda")
    mm_ms = median_ms(lambda: torch.relu(x @ w))
    return {"copy_gb_s": 2 * a.numel() * 4 / copy_ms / 1e6, "matmul_relu_ms": mm_ms,
            "device": torch.cuda.get_device_name()}


def check(bundle: Path) -> None:
    enter_bundle(bundle)
    from kiln.runtime.bundle.bench import device_copy_gb_s
    from kiln.runtime.tvm_runtime import import_tvm, load_cuda_runtime

    tvm = import_tvm()
    load_cuda_runtime(tvm)
    dev = tvm.cuda(0)
    vm = tvm.runtime.vm.VirtualMachine(
        tvm.runtime.load_module(str(bundle / "artifact" / "kernels.so")), dev)
    maps = Path("/proc/self/maps").read_text()
    print(f"tvm from {tvm.__file__}; libtvm_compiler loaded: {'libtvm_compiler' in maps}; "
          f"libcudart: {[ln.split()[-1] for ln in maps.splitlines() if 'libcudart' in ln][:1]}")
    rng = np.random.default_rng()
    rows = []
    for name, (m, k, n) in SHAPES.items():
        x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        args = [tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)]
        err = rel_error(vm[name](*args).numpy(), np.maximum(x.astype(np.float64) @ w, 0))
        sec = time_entry(vm, name, args, dev)
        rows.append((name, f"{m}x{k}x{n}", err, sec * 1e3, 2 * m * k * n / sec / 1e12))
    copy = device_copy_gb_s(tvm, dev)
    child = subprocess.run([sys.executable, __file__, "torch", "-"], capture_output=True,
                           text=True, check=True)
    t = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"\n{'entry':9s} {'M x K x N':>15s} {'rel err':>9s} {'ms':>8s} {'TFLOP/s':>8s}")
    for name, shape, err, ms, tflops in rows:
        print(f"{name:9s} {shape:>15s} {err:9.1e} {ms:8.3f} {tflops:8.2f}")
    m, k, n = SHAPES["mm_large"]
    print(f"{'torch':9s} {f'{m}x{k}x{n}':>15s} {'':9s} {t['matmul_relu_ms']:8.3f} "
          f"{2 * m * k * n / t['matmul_relu_ms'] / 1e9:8.2f}   (fp32, no TF32)")
    print(f"device-to-device copy, 1 GiB, read + write: TVM runtime {copy:.0f} GB/s, "
          f"torch {t['copy_gb_s']:.0f} GB/s on {t['device']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["build", "check", "torch"])
    p.add_argument("path", type=Path, help="build: output folder; check: the bundle")
    a = p.parse_args()
    if a.mode == "torch":
        print(json.dumps(torch_numbers()))
    else:
        build(a.path) if a.mode == "build" else check(a.path)


if __name__ == "__main__":
    main()
