"""Target facts, one frozen dataclass per target: what kernels and the TVM Target need."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from kiln.compiler.errors import KilnError

#: /proc/cpuinfo flag -> SIMD width in bits, widest first
_SIMD_FLAGS = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sse2", 128), ("asimd", 128))


@dataclass(frozen=True, slots=True)
class CpuTarget:
    """An LLVM CPU target: the -mcpu name, SIMD width and the threads kernels are written for."""

    mcpu: str
    vector_bits: int
    threads: int
    triple: str = ""
    name: str = "cpu"

    @property
    def kind(self) -> str:
        return "cpu"

    def lanes(self, itemsize: int = 4) -> int:
        """Elements of `itemsize` bytes in one SIMD register."""
        return max(1, self.vector_bits // (8 * itemsize))

    def tvm_dict(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"kind": "llvm", "mcpu": self.mcpu, "num-cores": self.threads}
        if self.triple:
            spec["mtriple"] = self.triple
        return spec

    def tvm_target(self):
        from tvm.target import Target

        return Target(self.tvm_dict())


#: compute dtypes a CUDA artifact can be built for (parameters, activations and the KV cache)
CUDA_DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True, slots=True)
class CudaTarget:
    """An NVIDIA GPU: its arch, the compute dtype (reductions, softmax and norms accumulate in
    float32 whatever it is) and the largest batch the decode step's CUDA graph is planned for."""

    arch: str = "sm_90"
    dtype: str = "float16"
    max_batch: int = 8
    name: str = "cuda"

    def __post_init__(self) -> None:
        if self.dtype not in CUDA_DTYPES:
            raise KilnError(f"cuda: dtype {self.dtype!r} is not one of {', '.join(CUDA_DTYPES)}")
        if not re.fullmatch(r"sm_\d+a?", self.arch):
            raise KilnError(f"cuda: arch {self.arch!r} is not of the form sm_XX")

    @property
    def kind(self) -> str:
        return "cuda"

    def tvm_dict(self) -> dict[str, Any]:
        return {"kind": "cuda", "arch": self.arch}

    def tvm_target(self):
        from tvm.target import Target

        return Target(self.tvm_dict(), host={"kind": "llvm"})


KilnTarget = CpuTarget | CudaTarget


@functools.cache
def host_cpu(threads: int | None = None) -> CpuTarget:
    """The CPU this process runs on: LLVM's host -mcpu, /proc/cpuinfo SIMD flags, usable cores."""
    return CpuTarget(mcpu=_llvm_host_cpu(), vector_bits=_simd_bits(_cpu_flags()),
                     threads=threads or _usable_cores())


def cpu(mcpu: str, *, vector_bits: int = 512, threads: int = 2) -> CpuTarget:
    """An explicit CPU target (cross-compiling, or pinning a tuning machine's settings)."""
    return CpuTarget(mcpu=mcpu, vector_bits=vector_bits, threads=threads)


def resolve(name: str) -> KilnTarget:
    """A target from its CLI name: "cpu" (the host), "cpu:znver4", "cuda" or "cuda:sm_90"."""
    kind, _, arg = name.partition(":")
    if kind == "cpu":
        return cpu(arg, vector_bits=host_cpu().vector_bits) if arg else host_cpu()
    if kind == "cuda":
        return CudaTarget(arch=arg or "sm_90")
    raise KilnError(f"unknown target {name!r} (expected cpu, cpu:<mcpu>, cuda or cuda:<sm_XX>)")


def _llvm_host_cpu() -> str:
    try:
        from tvm.target import codegen

        name = str(codegen.llvm_get_system_cpu())
        if name and name != "generic":
            return name
    except (ImportError, AttributeError):
        pass
    return "generic"


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    m = re.search(r"^(flags|Features)\s*:(.*)$", text, re.MULTILINE)
    return set(m.group(2).split()) if m else set()


def _simd_bits(flags: set[str]) -> int:
    return next((bits for flag, bits in _SIMD_FLAGS if flag in flags), 128)


def _usable_cores() -> int:
    from kiln.runtime.threads import usable_cores

    return usable_cores()
