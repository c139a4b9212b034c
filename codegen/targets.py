"""Target facts, one frozen dataclass per target: what kernels and the TVM Target need, the
capabilities the driver asks about, and the backend that builds for it.

The driver and codegen/build.py never test a target's kind: they ask it (the `Target`
protocol). A new target (ROCm, Arm) is a new dataclass registered with `register_target` and a
backend module (kiln.codegen.backend.Backend); the driver is not edited.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kiln.compiler.errors import KilnError
from kiln.compiler.fusions import FUSIONS

if TYPE_CHECKING:
    from kiln.codegen.backend import Backend

#: every fusion kiln has, for targets whose kernels take them all
ALL_FUSIONS = tuple(FUSIONS)


class Target(Protocol):
    """What the driver and build code ask a target. Capabilities are class attributes (so a
    recorded manifest's target name answers them without an instance)."""

    name: str
    kind: ClassVar[str]  # the name `resolve` knows it by ("cpu", "cuda")
    kv8: ClassVar[bool]  # int8 KV cache kernels (--quant kv8)
    sliding_windows: ClassVar[bool]  # attention kernels with a window shorter than the context
    pack_block: ClassVar[int]  # weights laid out [N / block, K, block] for it (0: as imported)
    sparse_layout: ClassVar[str | None]  # kiln.passes.sparsify target (None: no sparse kernels)
    quant_kernels: ClassVar[bool]  # weight-quantized linears (--quant w8, w4g32 ...)
    int8_activations: ClassVar[bool]  # their activations quantized to int8 (--quant ...-a8)
    #: int8 activations multiplied as codes in hardware (CPU: AVX-512 VNNI): where this holds,
    #: the int4 presets quantize their activations to int8 by default (QuantPreset.act_auto)
    int8_dot: bool
    tuning_tables: ClassVar[bool]  # reads `kiln tune` tables (--tuning)
    fusions: ClassVar[tuple[str, ...]]  # the kiln.passes.fusion fusions its lowering consumes

    @classmethod
    def from_arg(cls, arg: str) -> Target: ...  # from the CLI's "<kind>:<arg>"

    def tvm_dict(self) -> dict[str, Any]: ...
    def with_dtype(self, dtype: str) -> Target: ...  # --dtype, refused where unsupported
    def storage_dtype(self) -> str | None: ...  # floating parameters stored in (None: as is)
    def requirements(self) -> dict[str, Any]: ...  # the manifest's record of what it needs
    #: the kiln.passes.sparsify target whose kernel rates decide for this instance (None: its
    #: pruned weights stay dense); sparse_layout's family, refined by what the instance has
    def sparse_target(self) -> str | None: ...
    def backend(self) -> Backend: ...  # lowering and build hooks (imports TVM)


#: target kind -> its class (`resolve`, `target_type`); register_target adds one
TARGETS: dict[str, Callable[..., Any]] = {}


def register_target(cls):
    """Class decorator: make a Target resolvable by its `kind` (kiln compile --target KIND)."""
    TARGETS[cls.kind] = cls
    return cls


def target_type(kind: str):
    """The registered class of target `kind` (its capabilities, without an instance)."""
    if kind not in TARGETS:
        raise KilnError(f"unknown target {kind!r} (known: {', '.join(TARGETS)})")
    return TARGETS[kind]


def _float_only(target, dtype: str):
    if dtype != "float32":
        raise KilnError(f"--dtype {dtype}: the {target.name} target computes in float32 only")
    return target

#: /proc/cpuinfo flag -> SIMD width in bits, widest first
_SIMD_FLAGS = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("sse2", 128), ("asimd", 128))


#: words of LLVM's Intel CPU names (skylake-avx512, sapphirerapids, rocketlake, sierraforest,
#: tremont, knl, core-avx2, ...)
_INTEL_CPU_WORDS = ("lake", "rapids", "well", "bridge", "forest", "ridge", "mont", "knl", "knm",
                    "core", "nehalem", "westmere", "penryn", "atom")


@register_target
@dataclass(frozen=True, slots=True)
class CpuTarget:
    """An LLVM CPU target: the -mcpu name, SIMD width and the threads kernels are written for;
    `vnni`: AVX-512 VNNI and VBMI (the int8-activation GEMV, kiln.codegen.kernels.quant_linear)."""

    mcpu: str
    vector_bits: int
    threads: int
    triple: str = ""
    name: str = "cpu"
    vnni: bool = False

    kind: ClassVar[str] = "cpu"
    kv8: ClassVar[bool] = True
    sliding_windows: ClassVar[bool] = True
    pack_block: ClassVar[int] = 16  # one SIMD vector of fp32 per block
    sparse_layout: ClassVar[str | None] = "cpu"
    quant_kernels: ClassVar[bool] = True
    int8_activations: ClassVar[bool] = True
    tuning_tables: ClassVar[bool] = True
    #: the CPU kernels are one op each; the projections are fused in the graph
    fusions: ClassVar[tuple[str, ...]] = ("projections",)

    @classmethod
    def from_arg(cls, arg: str) -> CpuTarget:
        """"cpu" is the host, "cpu:znver4" an explicit -mcpu with the SIMD width LLVM gives it."""
        return _for_mcpu(arg) if arg else host_cpu()

    def with_dtype(self, dtype: str) -> CpuTarget:
        return _float_only(self, dtype)

    def storage_dtype(self) -> str | None:
        return None

    @property
    def int8_dot(self) -> bool:
        """VNNI's vpdpbusd multiplies int8 activation codes (kernels/quant_linear.py)."""
        return self.vnni

    def requirements(self) -> dict[str, Any]:
        flags = {512: ["avx512f"], 256: ["avx2", "bmi2"]}.get(self.vector_bits, [])
        flags += ["avx512_vnni", "avx512vbmi"] if self.vnni else []
        return {"cpu_flags": flags, "threads": self.threads}

    def sparse_target(self) -> str | None:
        """AVX-512 expands with vexpand, AVX2 with BMI2 + permutes (kiln.codegen.kernels.
        sparse_linear), at rates of their own; narrower vectors have no sparse kernels."""
        return {512: "cpu", 256: "cpu-avx2"}.get(self.vector_bits)

    def backend(self) -> Backend:
        from kiln.codegen.cpu_backend import BACKEND

        return BACKEND

    @property
    def vendor(self) -> str:
        """"amd", "intel", or "" (a generic -mcpu such as x86-64-v4, or not x86): from LLVM's
        CPU name, for defaults measured to differ between the two
        (kiln.codegen.cpu_spaces.SPARSE_GEMV)."""
        if self.mcpu.startswith(("znver", "bdver", "btver")):
            return "amd"
        return "intel" if any(w in self.mcpu for w in _INTEL_CPU_WORDS) else ""

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
#: kiln ships machine code only (no PTX), so an sm_90 artifact runs on the same GPUs as an
#: sm_90a one (H100, H200), and sm_90a's wgmma prefill is 1.5-1.7x faster (benchmarks/RESULTS.md,
#: "Session 14")
CUDA_DEFAULT_ARCH = "sm_90a"


@register_target
@dataclass(frozen=True, slots=True)
class CudaTarget:
    """An NVIDIA GPU: its arch, the compute dtype (reductions, softmax and norms accumulate in
    float32 whatever it is) and the largest batch the decode step's CUDA graph is planned for.
    The default arch is Hopper with its arch-specific instructions (CUDA_DEFAULT_ARCH)."""

    arch: str = CUDA_DEFAULT_ARCH
    dtype: str = "float16"
    max_batch: int = 16  # decode's intermediates are planned for this many rows
    name: str = "cuda"

    def __post_init__(self) -> None:
        if self.dtype not in CUDA_DTYPES:
            raise KilnError(f"cuda: dtype {self.dtype!r} is not one of {', '.join(CUDA_DTYPES)}")
        if not re.fullmatch(r"sm_\d+a?", self.arch):
            raise KilnError(f"cuda: arch {self.arch!r} is not of the form sm_XX")

    kind: ClassVar[str] = "cuda"
    kv8: ClassVar[bool] = True
    sliding_windows: ClassVar[bool] = True
    pack_block: ClassVar[int] = 0
    sparse_layout: ClassVar[str | None] = "cuda"
    quant_kernels: ClassVar[bool] = True
    int8_activations: ClassVar[bool] = False
    int8_dot: ClassVar[bool] = False
    tuning_tables: ClassVar[bool] = True
    fusions: ClassVar[tuple[str, ...]] = ALL_FUSIONS

    @classmethod
    def from_arg(cls, arg: str) -> CudaTarget:
        """"cuda" is sm_90a, "cuda:sm_80" another arch."""
        return cls(arch=arg or CUDA_DEFAULT_ARCH)

    def with_dtype(self, dtype: str) -> CudaTarget:
        return dataclasses.replace(self, dtype=dtype)

    def storage_dtype(self) -> str | None:
        return self.dtype

    def requirements(self) -> dict[str, Any]:
        # decode also returns the argmax tokens (Session.decode_greedy); the entry points take
        # past and one offset per row (rows of unequal lengths: Session.prefill_batch)
        return {"dtype": self.dtype, "max_batch": self.max_batch, "decode_greedy": True,
                "row_offsets": self.max_batch}

    def sparse_target(self) -> str | None:
        return self.sparse_layout

    def backend(self) -> Backend:
        from kiln.codegen.cuda.backend import BACKEND

        return BACKEND

    def tvm_dict(self) -> dict[str, Any]:
        return {"kind": "cuda", "arch": self.arch}

    def tvm_target(self):
        from tvm.target import Target

        return Target(self.tvm_dict(), host={"kind": "llvm"})


#: the type hint of the lowerings and build code (any registered target)
KilnTarget = Target


@functools.cache
def host_cpu(threads: int | None = None) -> CpuTarget:
    """The CPU this process runs on: LLVM's host -mcpu, /proc/cpuinfo SIMD flags, usable cores."""
    flags = _cpu_flags()
    bits = _simd_bits(flags)
    return CpuTarget(mcpu=_llvm_host_cpu(), vector_bits=bits, threads=threads or _usable_cores(),
                     vnni=bits >= 512 and {"avx512_vnni", "avx512vbmi"} <= flags)


def _for_mcpu(mcpu: str) -> CpuTarget:
    """An explicit -mcpu with the SIMD width and VNNI that LLVM gives that CPU (cross-compiling
    for an AVX2 machine from an AVX-512 one, say), and the host's threads."""
    from tvm.target import Target, codegen

    t = Target({"kind": "llvm", "mcpu": mcpu})
    if not codegen.llvm_is_valid_cpu(mcpu, codegen.llvm_get_system_triple()):
        raise KilnError(f"target cpu:{mcpu}: LLVM knows no CPU {mcpu!r}")
    features = {str(f) for f in codegen.llvm_get_cpu_features(t)}
    bits = 512 if "avx512f" in features else 256 if "avx2" in features else 128
    return cpu(mcpu, vector_bits=bits, threads=host_cpu().threads,
               vnni=bits >= 512 and {"avx512vnni", "avx512vbmi"} <= features)


def cpu(mcpu: str, *, vector_bits: int = 512, threads: int = 2, vnni: bool = False) -> CpuTarget:
    """An explicit CPU target (cross-compiling, or pinning a tuning machine's settings)."""
    return CpuTarget(mcpu=mcpu, vector_bits=vector_bits, threads=threads, vnni=vnni)


def resolve(name: str) -> Target:
    """A target from its CLI name "<kind>[:<arg>]": "cpu" (the host), "cpu:znver4", "cuda",
    "cuda:sm_90", or any registered kind."""
    kind, _, arg = name.partition(":")
    if kind not in TARGETS:
        raise KilnError(f"unknown target {name!r} (expected cpu, cpu:<mcpu>, cuda or "
                        f"cuda:<sm_XX>; registered: {', '.join(TARGETS)})")
    return TARGETS[kind].from_arg(arg)


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
