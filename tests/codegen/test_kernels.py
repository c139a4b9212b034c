"""Each TIR kernel (and each tiling configuration tried here) against the numpy interpreter."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.compiler.interpreter import transformer_ops as ref
from kiln.compiler.ir import Attrs
from tests.helpers import assert_close

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

from kiln.codegen.kernels import attention as attn_k  # noqa: E402
from kiln.codegen.kernels import elementwise as ew  # noqa: E402
from kiln.codegen.kernels import linear as lin  # noqa: E402
from kiln.codegen.kernels import packed_linear as plin  # noqa: E402
from kiln.codegen.kernels import prefill_attention as pattn  # noqa: E402
from kiln.codegen.targets import host_cpu  # noqa: E402


def compile_funcs(**funcs):
    mod = tvm.IRModule({k: f.with_attr("global_symbol", k) for k, f in funcs.items()})
    return tvm.compile(mod, target=host_cpu().tvm_target())


def t(a: np.ndarray):
    return tvm.runtime.tensor(np.ascontiguousarray(a))


LINEAR_CASES = [  # (n, k, m, config, bias): odd sizes exercise the K, M and N tails
    (37, 53, 5, lin.LinearConfig(4, 4), False),
    (64, 64, 8, lin.LinearConfig(2, 4), True),
    (33, 17, 1, lin.DECODE, True),
    (40, 100, 1, lin.LinearConfig(1, 16, prefetch=1), False),
    (52, 48, 23, lin.PREFILL, False),
    (30, 35, 13, lin.LinearConfig(6, 4, mb=8, nb=8), True),
    (20, 40, 7, lin.LinearConfig(2, 3, mb=4, nb=6), False),
]


@pytest.mark.parametrize(("n", "k", "m", "cfg", "bias"), LINEAR_CASES)
def test_linear(rng, n, k, m, cfg, bias):
    lib = compile_funcs(f=lin.linear_kernel(n, k, cfg, bias=bias))
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y = t(np.zeros((m, n), np.float32))
    lib["f"](t(x), t(w), *([t(b)] if bias else []), y)
    want = ref.linear([x, w, b if bias else None], Attrs())[0]
    assert_close(y.numpy(), want, name=f"linear {cfg}")


def test_linear_search_space_is_valid():
    assert lin.DECODE in lin.SEARCH_SPACE or lin.DECODE.mr == 1
    assert all(c.mr * c.nr + c.mr + c.nr <= 32 for c in lin.SEARCH_SPACE)
    with pytest.raises(ValueError, match="bad linear tiling"):
        lin.LinearConfig(mr=0)


def test_elementwise_kernels(rng):
    lib = compile_funcs(add=ew.binary_kernel(ew.BINARY["Add"]),
                        mul=ew.binary_kernel(ew.BINARY["Mul"]),
                        silu=ew.unary_kernel(ew.UNARY["silu"]),
                        rms=ew.rms_norm_kernel(37, 1e-5),
                        emb=ew.embedding_kernel(50, 37))
    a = rng.standard_normal(20011, dtype=np.float32) * 6
    b = rng.standard_normal(20011, dtype=np.float32)
    out = t(np.zeros_like(a))
    lib["add"](t(a), t(b), out)
    assert_close(out.numpy(), a + b, name="Add")
    lib["mul"](t(a), t(b), out)
    assert_close(out.numpy(), a * b, name="Mul")
    lib["silu"](t(a), out)
    assert_close(out.numpy(), ref.silu([a], Attrs())[0], atol=1e-6, name="silu")
    x = rng.standard_normal((5, 37), dtype=np.float32)
    w = rng.standard_normal(37, dtype=np.float32)
    y = t(np.zeros_like(x))
    lib["rms"](t(x), t(w), y)
    assert_close(y.numpy(), ref.rms_norm([x, w], Attrs({"eps": 1e-5}))[0], name="rms_norm")
    table = rng.standard_normal((50, 37), dtype=np.float32)
    ids = rng.integers(0, 50, 6)
    y = t(np.zeros((6, 37), np.float32))
    lib["emb"](t(table), t(ids), y)
    assert_close(y.numpy(), ref.embedding([table, ids], Attrs())[0], name="embedding")


@pytest.mark.parametrize("bias", [False, True])
def test_layer_norm_gelu_silu_mul_columns(rng, bias):
    lib = compile_funcs(ln=ew.layer_norm_kernel(37, 1e-5, bias=bias),
                        gelu=ew.unary_kernel(ew.UNARY["gelu"]),
                        gelu_tanh=ew.unary_kernel(ew.UNARY["gelu_tanh"]),
                        silu_mul=ew.binary_kernel(ew.BINARY["silu_mul"]),
                        cols=ew.columns_kernel(37, 5, 19))
    x = rng.standard_normal((6, 37), dtype=np.float32) * 3
    w, b = (rng.standard_normal(37, dtype=np.float32) for _ in range(2))
    y = t(np.zeros_like(x))
    lib["ln"](t(x), t(w), *([t(b)] if bias else []), y)
    want = ref.layer_norm([x, w, b if bias else None], Attrs({"eps": 1e-5}))[0]
    assert_close(y.numpy(), want, name="layer_norm")
    flat, up = x.reshape(-1), rng.standard_normal(x.size, dtype=np.float32)
    out = t(np.zeros_like(flat))
    for name, approx in (("gelu", "none"), ("gelu_tanh", "tanh")):
        lib[name](t(flat), out)
        want = ref.gelu([flat], Attrs({"approximate": approx}))[0]
        assert_close(out.numpy(), want, atol=1e-6, name=name)
    lib["silu_mul"](t(flat), t(up), out)
    assert_close(out.numpy(), ref.silu_mul([flat, up], Attrs())[0], atol=1e-6, name="silu_mul")
    cols = t(np.zeros((6, 19), np.float32))
    lib["cols"](t(x), cols)
    assert_close(cols.numpy(), x[:, 5:24], name="Split columns")


@pytest.mark.parametrize(("rot", "interleaved", "cos_batch"), [(8, False, 2), (6, False, 1),
                                                               (8, True, 1)])
def test_rotary(rng, rot, interleaved, cos_batch):
    lib = compile_funcs(f=ew.rotary_kernel(3, 8, rot, interleaved=interleaved))
    x = rng.standard_normal((2, 5, 24), dtype=np.float32)
    cos, sin = (rng.standard_normal((cos_batch, 5, rot), dtype=np.float32) for _ in range(2))
    y = t(np.zeros_like(x))
    lib["f"](t(x), t(cos), t(sin), y)
    attrs = Attrs({"num_heads": 3, "head_dim": 8, "interleaved": interleaved})
    assert_close(y.numpy(), ref.rotary([x, cos, sin], attrs)[0], name="rotary")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("b", "past", "s", "block"), [(2, 0, 7, 4), (1, 5, 1, 32),
                                                        (2, 13, 20, 8)])
def test_kv_append_and_attention(rng, masked, b, past, s, block):
    h, kvh, d, cap, scale = 6, 2, 24, 40, 0.3
    lib = compile_funcs(append=attn_k.kv_append_kernel(kvh, d),
                        attn=attn_k.attention_kernel(h, kvh, d, scale, masked=masked,
                                                     block=block))
    pk, pv = (rng.standard_normal((b, kvh, past, d), dtype=np.float32) for _ in range(2))
    q = rng.standard_normal((b, s, h * d), dtype=np.float32)
    k, v = (rng.standard_normal((b, s, kvh * d), dtype=np.float32) for _ in range(2))
    mask = (rng.random((b, past + s)) > 0.25).astype(np.int64)
    mask[:, -1] = 1  # every query sees at least itself: padded rows are compared elsewhere
    caches = []
    for p in (pk, pv):
        c = rng.standard_normal((b, kvh, cap, d), dtype=np.float32)  # stale rows: never read
        c[:, :, :past] = p
        caches.append(t(c))
    lib["append"](*caches, t(k), t(v), past)
    out = t(np.zeros_like(q))
    lib["attn"](t(q), *caches, *([t(mask)] if masked else []), past, out)
    attrs = Attrs({"num_heads": h, "num_kv_heads": kvh, "head_dim": d, "scale": scale,
                   "causal": True})
    want = ref.attention([q, k, v, pk, pv, mask if masked else None], attrs)
    assert_close(out.numpy(), want[0], name="attention")
    assert_close(caches[0].numpy()[:, :, :past + s], want[1], name="present_k")
    assert_close(caches[1].numpy()[:, :, :past + s], want[2], name="present_v")


def test_kv_append_refuses_overflow(rng):
    lib = compile_funcs(append=attn_k.kv_append_kernel(1, 4))
    caches = [t(np.zeros((1, 1, 3, 4), np.float32)) for _ in range(2)]
    new = t(rng.standard_normal((1, 2, 4), dtype=np.float32))
    with pytest.raises(Exception, match="capacity"):
        lib["append"](*caches, new, new, 2)


PACKED_CASES = [  # (n, k, m, config, bias): N = 16 * blocks; odd K, M and panel tails
    (48, 53, 5, plin.PackedConfig(4, 4), False),
    (64, 64, 8, plin.PREFILL, True),
    (80, 17, 1, plin.DECODE, True),
    (112, 100, 23, plin.PackedConfig(6, 4), False),
    (32, 35, 13, plin.PackedConfig(12, 2), True),
] + [(16 * 7, 29, 19, cfg, False) for cfg in plin.SEARCH_SPACE]


@pytest.mark.parametrize(("n", "k", "m", "cfg", "bias"), PACKED_CASES)
def test_packed_linear(rng, n, k, m, cfg, bias):
    lib = compile_funcs(f=plin.packed_linear_kernel(n, k, cfg, bias=bias))
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(n, dtype=np.float32)
    y = t(np.zeros((m, n), np.float32))
    lib["f"](t(x), t(plin.pack(w, 16)), *([t(b)] if bias else []), y)
    want = ref.linear([x, w, b if bias else None], Attrs())[0]
    assert_close(y.numpy(), want, name=f"packed linear {cfg}")


def test_packed_linear_refuses_ragged_n():
    with pytest.raises(ValueError, match="multiple"):
        plin.packed_linear_kernel(40, 8, plin.PREFILL)
    with pytest.raises(ValueError, match="bad packed"):
        plin.PackedConfig(mr=8, nv=4)


def test_packed_embedding_and_last_position(rng):
    lib = compile_funcs(emb=ew.packed_embedding_kernel(48, 37, 16),
                        last=ew.last_position_kernel(37))
    table = rng.standard_normal((48, 37), dtype=np.float32)
    ids = rng.integers(0, 48, 9)
    y = t(np.zeros((9, 37), np.float32))
    lib["emb"](t(plin.pack(table, 16)), t(ids), y)
    assert_close(y.numpy(), table[ids], name="packed embedding")
    x = rng.standard_normal((3, 5, 37), dtype=np.float32)
    last = t(np.zeros((3, 1, 37), np.float32))
    lib["last"](t(x), last)
    assert_close(last.numpy(), x[:, -1:], name="last position")


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("b", "past", "s", "queries"), [(2, 0, 7, 3), (1, 5, 33, 8),
                                                          (2, 13, 20, 1), (1, 0, 50, 4)])
def test_prefill_attention(rng, masked, b, past, s, queries):
    h, kvh, d, cap, scale = 6, 2, 32, 90, 0.3
    lib = compile_funcs(attn=pattn.prefill_attention_kernel(h, kvh, d, scale, queries=queries,
                                                            masked=masked))
    q = rng.standard_normal((b, s, h * d), dtype=np.float32)
    k, v = (rng.standard_normal((b, s, kvh * d), dtype=np.float32) for _ in range(2))
    pk, pv = (rng.standard_normal((b, kvh, past, d), dtype=np.float32) for _ in range(2))
    mask = (rng.random((b, past + s)) > 0.25).astype(np.int64)
    mask[0, : past + 3] = 0  # left padding: early queries see no key at all (output 0)
    caches = []
    for p, new in ((pk, k), (pv, v)):
        c = rng.standard_normal((b, kvh, cap, d), dtype=np.float32)  # stale rows: never read
        c[:, :, :past] = p
        c[:, :, past:past + s] = new.reshape(b, s, kvh, d).transpose(0, 2, 1, 3)
        caches.append(t(c))
    out = t(np.zeros_like(q))
    lib["attn"](t(q), *caches, *([t(mask)] if masked else []), past, out)
    attrs = Attrs({"num_heads": h, "num_kv_heads": kvh, "head_dim": d, "scale": scale,
                   "causal": True})
    want = ref.attention([q, k, v, pk, pv, mask if masked else None], attrs)
    assert_close(out.numpy(), want[0], name=f"prefill attention x{queries}")
