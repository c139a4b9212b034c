"""The compiled prefill/decode module of a tiny canonical Llama vs the numpy interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kiln.codegen.testing import TINY, canonical_llama_graph
from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.ir import Node
from tests.helpers import assert_close

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from kiln.codegen.build import build, build_module, compile_module  # noqa: E402
from kiln.codegen.targets import CudaTarget, host_cpu  # noqa: E402

CAPACITY = 80


@pytest.fixture(scope="module")
def graph():
    return canonical_llama_graph(TINY, seed=0)


@pytest.fixture(scope="module")
def compiled(graph, tmp_path_factory):
    path = tmp_path_factory.mktemp("build") / "tiny.so"
    sig = build(graph, host_cpu(), path)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    params = tuple(tvm.runtime.tensor(graph.params[p].load()) for p in sig.params)
    return path, sig, vm, params


def _caches(sig, b: int):
    return tuple(tvm.runtime.tensor(np.zeros((b, c.kv_heads, CAPACITY, c.head_dim), np.float32))
                 for c in sig.caches)


def _feeds(ids: np.ndarray, past: int, mask: np.ndarray | None = None) -> list[np.ndarray]:
    b, s = ids.shape
    mask = np.ones((b, past + s), np.int64) if mask is None else mask
    pos = np.maximum(np.cumsum(mask, axis=1)[:, past:] - 1, 0)  # left padding shifts positions
    return [ids, pos, mask]


def _call(vm, entry: str, sig, past: int, feeds, caches, params) -> np.ndarray:
    args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in feeds]
    return vm[entry](tvm.runtime.ShapeTuple([past]), *args, caches, params).numpy()


def _reference(graph, sig, feeds) -> np.ndarray:
    b = feeds[0].shape[0]
    env = dict(zip(("input_ids", "position_ids", "attention_mask"), feeds, strict=True))
    for c in sig.caches:
        env[c.name] = np.zeros((b, c.kv_heads, 0, c.head_dim), np.float32)
    return run(graph, env, outputs=["logits"])["logits"]


@pytest.mark.parametrize("n", [1, 7, 64])
def test_prefill_matches_interpreter(graph, compiled, rng, n):
    _, sig, vm, params = compiled
    feeds = _feeds(rng.integers(0, TINY.vocab, (2, n)), 0)
    got = _call(vm, "prefill", sig, 0, feeds, _caches(sig, 2), params)
    assert_close(got, _reference(graph, sig, feeds), name=f"prefill({n}) logits")


def test_prefill_then_decode_matches_longer_prefill(graph, compiled, rng):
    _, sig, vm, params = compiled
    n, k = 6, 4
    ids = rng.integers(0, TINY.vocab, (2, n + k))
    want = _reference(graph, sig, _feeds(ids, 0))
    caches = _caches(sig, 2)
    got = [_call(vm, "prefill", sig, 0, _feeds(ids[:, :n], 0), caches, params)]
    for p in range(n, n + k):
        got.append(_call(vm, "decode", sig, p, _feeds(ids[:, p:p + 1], p), caches, params))
    assert_close(np.concatenate(got, axis=1), want, name="prefill(n)+decode logits")


def test_left_padded_batch(graph, compiled, rng):
    _, sig, vm, params = compiled
    ids = rng.integers(0, TINY.vocab, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :3] = 0
    feeds = _feeds(ids, 0, mask)
    got = _call(vm, "prefill", sig, 0, feeds, _caches(sig, 2), params)
    want = _reference(graph, sig, feeds)
    # rows of padding tokens attend to nothing: only real tokens' logits are defined
    assert_close(got[0], want[0], name="unpadded row")
    assert_close(got[1, 3:], want[1, 3:], name="padded row, real tokens")


def test_runtime_only_vm_loads_artifact(graph, compiled, rng):
    """The exported library runs with libtvm_runtime alone (TVM_USE_RUNTIME_LIB=1)."""
    path, sig, vm, params = compiled
    ids = rng.integers(0, TINY.vocab, (1, 5))
    want = _call(vm, "prefill", sig, 0, _feeds(ids, 0), _caches(sig, 1), params)
    script = f"""
import json, sys, numpy as np, tvm
from tvm.runtime.vm import VirtualMachine
assert "libtvm_compiler" not in open("/proc/self/maps").read()
vm = VirtualMachine(tvm.runtime.load_module({str(path)!r}), tvm.cpu())
spec = json.loads(sys.stdin.read())
caches = tuple(tvm.runtime.tensor(np.zeros(s, np.float32)) for s in spec["caches"])
params = tuple(tvm.runtime.tensor(np.load(p)) for p in spec["params"])
feeds = [tvm.runtime.tensor(np.array(a, np.int64)) for a in spec["feeds"]]
out = vm["prefill"](tvm.runtime.ShapeTuple([0]), *feeds, caches, params).numpy()
np.save(spec["out"], out)
"""
    tmp = path.parent
    files = []
    for i, p in enumerate(params):
        files.append(str(tmp / f"p{i}.npy"))
        np.save(files[-1], p.numpy())
    spec = {"caches": [[1, c.kv_heads, CAPACITY, c.head_dim] for c in sig.caches],
            "params": files, "feeds": [a.tolist() for a in _feeds(ids, 0)],
            "out": str(tmp / "out.npy")}
    env = {**os.environ, "TVM_USE_RUNTIME_LIB": "1"}
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(spec), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_close(np.load(tmp / "out.npy"), want, name="runtime-only prefill")


def test_kv_cache_written_in_place(compiled, rng):
    _, sig, vm, params = compiled
    caches = _caches(sig, 1)
    _call(vm, "prefill", sig, 0, _feeds(rng.integers(0, TINY.vocab, (1, 3)), 0), caches, params)
    k0 = caches[0].numpy()
    assert np.abs(k0[:, :, :3]).min() > 0, "rows 0..2 of the passed cache were not written"
    assert not k0[:, :, 3:].any(), "rows past the prompt must stay untouched"


def test_missing_lowering_names_op_node_target(graph):
    bad = graph.replace(nodes=(*graph.nodes[:-1], Node("Frobnicate", graph.nodes[-1].inputs,
                                                        graph.nodes[-1].outputs,
                                                        name="frob_1")))
    with pytest.raises(KilnError, match=r"no lowering for op Frobnicate \(node frob_1\) on "
                                        r"target cpu"):
        build_module(bad, host_cpu(), entry_points=("decode",))


def test_cuda_target_builds_every_entry_point(graph):
    """The CUDA lowering table covers this graph (its unfused ops through the generic
    lowerings): the three entry points and decode's device argmax are in the module."""
    mod, sig = build_module(graph, CudaTarget())
    assert sig.entry_points == ("prefill", "decode", "prefill_last")
    names = {gv.name_hint for gv in mod.functions}
    assert set(sig.entry_points) <= names and any(n.startswith("cuda_argmax") for n in names)


def test_compile_module_returns_loadable_executable(graph):
    mod, sig = build_module(graph, host_cpu(), entry_points=("decode",))
    assert sig.entry_points == ("decode",)
    assert {"decode"} <= {gv.name_hint for gv in mod.functions}
    assert compile_module(mod, host_cpu()) is not None


@pytest.mark.parametrize("fixture", ["llama-optimum.onnx", "gpt2-optimum.onnx"])
def test_recognized_fixture_matches_interpreter(rng, fixture):
    """Graphs from the real pipeline (fused q/k/v + Split, silu_mul, layer_norm, gelu, biases)."""
    from pathlib import Path

    from kiln.compiler.compile import compile_graph

    model = Path(__file__).parents[1] / "data" / fixture
    g = compile_graph(model, max_seq=64, progress=lambda msg: None, weights_optional=False)
    mod, sig = build_module(g, host_cpu())
    vm = tvm.runtime.vm.VirtualMachine(compile_module(mod, host_cpu()), tvm.cpu())
    params = tuple(tvm.runtime.tensor(np.ascontiguousarray(g.params[p].load()))
                   for p in sig.params)
    vocab = g.types[sig.outputs[0]].shape[-1]
    ids = rng.integers(0, vocab, (2, 6))
    full = dict(zip(("input_ids", "position_ids", "attention_mask"), _feeds(ids, 0),
                    strict=True))
    env = {v: full[v] for v in sig.inputs}
    for c in sig.caches:
        env[c.name] = np.zeros((2, c.kv_heads, 0, c.head_dim), np.float32)
    want = run(g, env, outputs=[sig.outputs[0]])[sig.outputs[0]]
    caches = _caches(sig, 2)
    got = [vm["prefill"](tvm.runtime.ShapeTuple([0]), *_named(sig, ids[:, :5], 0), caches,
                         params).numpy()]
    got.append(vm["decode"](tvm.runtime.ShapeTuple([5]), *_named(sig, ids[:, 5:], 5), caches,
                            params).numpy())
    assert_close(np.concatenate(got, axis=1), want, name=f"{fixture} logits")


def _named(sig, ids: np.ndarray, past: int) -> list:
    full = dict(zip(("input_ids", "position_ids", "attention_mask"), _feeds(ids, past),
                    strict=True))
    return [tvm.runtime.tensor(np.ascontiguousarray(full[v])) for v in sig.inputs]


def test_linear_tiling_per_shape_override():
    """A database entry for one (phase, n, k) instance changes that instance's tiling only."""
    from kiln.codegen import cpu_spaces
    from kiln.codegen.schedules import Schedules, TuningDB, bucket, target_key
    from kiln.codegen.targets import cpu

    target = cpu("znver4")
    shape = {"phase": "decode", "m": 1, "n": 576, "k": 576, "bias": False, "dtype": "float32"}
    tuned = {"mr": 1, "nr": 8, "mb": 0, "nb": 0, "prefetch": 4}
    db = TuningDB(target_key(target))
    db.record("cpu.linear", bucket(shape, ("m",)), tuned, 1.0, 2.0)
    s = Schedules(target, db)
    assert s.pick("cpu.linear", shape) == tuned
    assert s.pick("cpu.linear", {**shape, "n": 192}) == cpu_spaces.LINEAR.default(shape, target)


def test_packed_weights_and_prefill_last(graph, rng, tmp_path):
    """pack_linear_weights' layout ([N/16, K, 16], tied table included) computes the same logits;
    prefill_last returns the last position's alone."""
    from kiln.codegen.testing import LlamaConfig
    from kiln.passes import get_pass

    cfg = LlamaConfig(vocab=96, hidden=48, layers=1, heads=4, kv_heads=2, head_dim=12, ffn=80,
                      max_pos=128)
    plain = canonical_llama_graph(cfg, seed=1)
    packed = get_pass("pack_linear_weights")(plain, block=16)
    assert "embed_tokens.packed16" in packed.params and "embed_tokens" not in packed.params
    sig = build(packed, host_cpu(), tmp_path / "packed.so")
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "packed.so")),
                                       tvm.cpu())
    params = tuple(tvm.runtime.tensor(packed.params[p].load()) for p in sig.params)
    feeds = _feeds(rng.integers(0, cfg.vocab, (2, 11)), 0)
    want = _reference(plain, sig, feeds)
    got = _call(vm, "prefill", sig, 0, feeds, _caches(sig, 2), params)
    assert_close(got, want, name="packed prefill logits")
    last = _call(vm, "prefill_last", sig, 0, feeds, _caches(sig, 2), params)
    assert last.shape == (2, 1, cfg.vocab)
    assert_close(last, want[:, -1:], name="prefill_last logits")
