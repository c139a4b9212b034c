"""Targets are objects the driver asks: a third target declared here, registered through
kiln.codegen.targets, is resolved by `kiln compile --target`, its capabilities decide what the
driver refuses and which fusions run, and its backend gets the graph, without driver edits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from kiln.codegen import targets
from kiln.codegen.backend import Backend
from kiln.compiler.errors import KilnError
from kiln.passes.fusion import recorded


class Built(Exception):
    """Raised by the fake backend once it has the graph (it has no kernels to build)."""

    def __init__(self, graph, target):
        super().__init__("built")
        self.graph, self.target = graph, target


def _stop(graph, target, sig):
    raise Built(graph, target)


@dataclass(frozen=True, slots=True)
class FakeTarget:
    """A target with few capabilities, two fusions and a backend that stops at the graph."""

    arch: str = "v1"
    name: str = "fake"

    kind: ClassVar[str] = "fake"
    kv8: ClassVar[bool] = False
    sliding_windows: ClassVar[bool] = False
    pack_block: ClassVar[int] = 0
    sparse_layout: ClassVar[str | None] = None
    quant_kernels: ClassVar[bool] = False
    int8_activations: ClassVar[bool] = False
    int8_dot: ClassVar[bool] = False
    tuning_tables: ClassVar[bool] = False
    fusions: ClassVar[tuple[str, ...]] = ("projections", "swiglu")

    @classmethod
    def from_arg(cls, arg: str) -> FakeTarget:
        return cls(arch=arg or "v1")

    def tvm_dict(self) -> dict[str, Any]:
        return {"kind": "fake", "arch": self.arch}

    def with_dtype(self, dtype: str) -> FakeTarget:
        raise KilnError(f"--dtype {dtype}: target fake has one dtype")

    def storage_dtype(self) -> str | None:
        return None

    def requirements(self) -> dict[str, Any]:
        return {}

    def sparse_target(self) -> str | None:
        return None

    def backend(self) -> Backend:
        return Backend(context=object, lower_node=None, last_position=None, compile=None,
                       compile_kernels=None, compiler="none", signature=_stop)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setitem(targets.TARGETS, "fake", FakeTarget)
    return FakeTarget


def test_a_registered_target_is_resolved_by_name(fake):
    assert targets.resolve("fake:v2") == FakeTarget("v2")
    assert targets.target_type("fake").fusions == ("projections", "swiglu")
    with pytest.raises(KilnError, match="registered: cpu, cuda, fake"):
        targets.resolve("rocm")


def test_the_driver_runs_its_fusions_and_hands_its_backend_the_graph(fake, tiny_model,
                                                                     tmp_path):
    from kiln.compiler.compile import compile_model

    with pytest.raises(Built) as e:
        compile_model(tiny_model, tmp_path / "a", target="fake:v3", max_seq=64, weights=False)
    g = e.value.graph
    assert e.value.target == FakeTarget("v3")
    assert recorded(g, "projections") and recorded(g, "swiglu")
    assert not recorded(g, "norm_linear") and not recorded(g, "qkv_rope")
    assert not any(n.attrs.get("packed") for n in g.nodes)  # pack_block 0
    with pytest.raises(Built) as e:
        compile_model(tiny_model, tmp_path / "b", target="fake", max_seq=64, weights=False,
                      no_fuse=("swiglu",))
    assert not recorded(e.value.graph, "swiglu")


@pytest.mark.parametrize(("kw", "error"), [
    ({"quant": "kv8"}, "int8 KV cache"),
    ({"quant": "w8"}, "target fake has no quantized kernels"),
    ({"tuning": "t.json"}, "--tuning"),
    ({"dtype": "float16"}, "one dtype"),
])
def test_its_capabilities_decide_what_is_refused(fake, tiny_model, tmp_path, kw, error,
                                                  monkeypatch):
    from kiln.compiler.compile import compile_model

    if kw.get("quant") == "kv8":  # past the weight-kernel check, to the KV cache one
        monkeypatch.setattr(FakeTarget, "quant_kernels", True)

    with pytest.raises(KilnError, match=error):
        compile_model(tiny_model, tmp_path / "a", target="fake", max_seq=64, weights=False,
                      **kw)


def test_cpu_and_cuda_declare_their_capabilities():
    cpu, cuda = targets.target_type("cpu"), targets.target_type("cuda")
    assert (cpu.kv8, cpu.sliding_windows, cpu.pack_block) == (True, True, 16)
    assert (cuda.kv8, cuda.sliding_windows, cuda.pack_block) == (True, True, 0)
    assert cpu.fusions == ("projections",)
    assert set(cuda.fusions) == set(targets.ALL_FUSIONS)


def test_an_explicit_cpu_takes_its_vector_width_from_llvm():
    """cpu:MCPU describes that CPU, not the host: cross-compiling for AVX2 from AVX-512."""
    haswell, znver4 = targets.resolve("cpu:haswell"), targets.resolve("cpu:znver4")
    assert (haswell.vector_bits, haswell.vnni) == (256, False)
    assert haswell.requirements()["cpu_flags"] == ["avx2", "bmi2"]
    assert (znver4.vector_bits, znver4.vnni) == (512, True)
    assert targets.resolve("cpu:x86-64").vector_bits == 128
    with pytest.raises(KilnError, match="LLVM knows no CPU 'pentium9'"):
        targets.resolve("cpu:pentium9")
