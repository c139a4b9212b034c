"""Cross-compiling CUDA without a GPU: the driver stub, a dlight-scheduled matmul+relu compiled to
a fatbin for sm_90, the fatbin checker (both outcomes), and where a GPU exists, a numpy check."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.codegen import cuda_toolchain as ct
from kiln.compiler.errors import KilnError
from tests.conftest import has_gpu
from tests.helpers import assert_close, needs_cuda_toolchain

tvm = pytest.importorskip("tvm")
pytestmark = [pytest.mark.tvm, needs_cuda_toolchain]

M, K, N = 128, 256, 64


def matmul_relu():
    """relu(x @ w) in Relax; the CUDA pipeline schedules it with dlight."""
    from tvm import relax
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((M, K), "float32"), w: R.Tensor((K, N), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.matmul(x, w))
                R.output(y)
            return y

    assert isinstance(Module["main"], relax.Function)
    return Module


def sm90():
    from tvm.target import Target

    return Target({"kind": "cuda", "arch": "sm_90"}, host={"kind": "llvm"})


@pytest.fixture(scope="module")
def kernels(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cuda") / "matmul_relu.so"
    ct.compile_for_cuda(matmul_relu(), sm90()).export_library(str(path))
    return path


def test_driver_symbols_are_the_cuda_runtimes_needs():
    names = ct.driver_symbols(ct.tvm_lib_dir() / "libtvm_runtime_cuda.so")
    assert {"cuModuleLoadData", "cuModuleGetFunction", "cuLaunchKernelEx"} <= set(names)
    assert not [n for n in names if n.startswith("cuda")], "runtime API symbols are not driver's"


def test_stub_answers_no_device(tmp_path):
    stub = ct.build_driver_stub(cache=tmp_path)
    assert ct.build_driver_stub(cache=tmp_path) == stub, "second call rebuilt the stub"
    code = (  # in a child: a libcuda.so.1 loaded here would shadow a real driver loaded later
        "import ctypes, sys\n"
        "lib = ctypes.CDLL(sys.argv[1])\n"
        "msg = ctypes.c_char_p()\n"
        "print(lib.cuModuleUnload(None), lib.cuGetErrorName(100, ctypes.byref(msg)),"
        " msg.value.decode())\n")
    p = subprocess.run([sys.executable, "-c", code, str(stub)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    unload, name, message = p.stdout.split(maxsplit=2)
    assert int(unload) == int(name) == ct.CUDA_ERROR_NO_DEVICE
    assert "NO_DEVICE" in message


def test_compiled_library_holds_sm90_machine_code(kernels):
    assert ct.has_fatbin(kernels)
    assert ("cubin", "sm_90") in ct.fatbin_entries(kernels)
    ct.require_fatbin(kernels, "sm_90")
    with pytest.raises(KilnError, match="not sm_80"):
        ct.require_fatbin(kernels, "sm_80")


def test_checker_refuses_embedded_source(tmp_path):
    src = tmp_path / "source.so"
    src.write_bytes(b"\x7fELF...\n" + ct.CUDA_SOURCE_MARK + b" void k() {}\n")
    assert not ct.has_fatbin(src)
    with pytest.raises(KilnError, match="CUDA source"):
        ct.require_fatbin(src)
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"\x7fELF" + bytes(64))
    assert not ct.has_fatbin(empty)


@pytest.mark.skipif(ct.has_real_driver(), reason="the trap only exists without a driver")
def test_without_the_toolchain_tvm_embeds_source(tmp_path):
    """The trap the toolchain avoids: no driver stub -> CUDA source in the library."""
    code = (
        "import os, sys\n"
        "import tvm\n"
        "from tests.codegen.test_cuda_toolchain import matmul_relu, sm90\n"
        "os.environ['TVM_CUDA_COMPILE_MODE'] = 'nvcc'\n"
        "t = sm90()\n"
        "with t:\n"
        "    tvm.compile(matmul_relu(), t).export_library(sys.argv[1])\n")
    out = tmp_path / "source.so"
    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}  # set by runtime
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                       timeout=300, cwd=Path(__file__).parents[2], env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert not ct.has_fatbin(out)


@pytest.mark.gpu
@pytest.mark.skipif(not has_gpu(), reason="needs an NVIDIA GPU")
def test_runs_on_the_gpu(kernels, rng):
    from kiln.runtime.tvm_runtime import load_cuda_runtime

    load_cuda_runtime(tvm)
    dev = tvm.cuda(0)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(kernels)), dev)
    x = rng.standard_normal((M, K), dtype=np.float32)
    w = rng.standard_normal((K, N), dtype=np.float32)
    y = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()
    assert_close(y, np.maximum(x.astype(np.float64) @ w, 0).astype(np.float32))


def test_cheap_frame_stacks_give_what_inspect_stack_gives():
    """The frames, file names, line numbers, function names and line of context TVMScript reads
    are the same as inspect.stack()'s (only the per-frame module search is skipped)."""
    import inspect

    from kiln.codegen.cuda_toolchain import cheap_frame_stacks

    def fields(frames):
        return [(f.frame, f.filename, f.lineno, f.function, f.code_context, f.index)
                for f in frames]

    want = fields(inspect.stack())
    with cheap_frame_stacks():
        got = fields(inspect.stack())
    assert got[0][1:4] == (want[0][1], want[0][2] + 2, want[0][3])  # this function, 2 lines on
    assert got[1:] == want[1:]
    assert inspect.stack is not None and inspect.stack.__module__ == "inspect"  # restored
