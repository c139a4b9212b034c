"""kiln.runtime.convert evaluates the manifest's derivation trees with numpy alone: every transform
gives, bit for bit, what the compiler's PARAM_TRANSFORMS give (then stored in the parameter's
dtype as compile.py stores it); the quantizer is the compiler's (one function,
kiln.runtime.quant_format.quantize_codes: its own tests are tests/runtime/test_quant_format.py);
the safetensors writer is read back by the safetensors library."""

from __future__ import annotations

import numpy as np
import pytest

import kiln.compiler.frontend.onnx_quant_import
import kiln.passes.gptq
import kiln.passes.prune_weights
import kiln.passes.quantize
from kiln.compiler.compile import _as_dtype
from kiln.compiler.errors import KilnError
from kiln.compiler.ir import PARAM_TRANSFORMS, Attrs, Derived, DType, ExternalData
from kiln.runtime import convert
from kiln.runtime.convert import TRANSFORMS, derive
from kiln.runtime.params import read_safetensors, write_safetensors

assert kiln.compiler.frontend.onnx_quant_import and kiln.passes.gptq  # their transforms
assert kiln.passes.prune_weights and kiln.passes.quantize  # prune_magnitude, quantize


@pytest.fixture(scope="module")
def leaves(tmp_path_factory) -> dict[str, ExternalData]:
    """Tensors of several dtypes in one external data file, as the compiler's leaves."""
    rng = np.random.default_rng(11)
    arrays = {
        "w": rng.standard_normal((48, 70), dtype=np.float32) * 0.1,
        "v": rng.standard_normal((16, 70), dtype=np.float32),
        "h": rng.standard_normal((24, 32)).astype(np.float16),
        "b": rng.standard_normal((16, 64)).astype(DType.bf16.numpy),
        "u8": rng.integers(0, 256, (12, 32), dtype=np.uint8),
        "zp": rng.integers(0, 256, (48 * 2,), dtype=np.uint8),
        "one": np.array([0.25], np.float32),
        "sp24": _two_four(rng.standard_normal((32, 64), dtype=np.float32)),
    }
    path = tmp_path_factory.mktemp("weights") / "model.onnx.data"
    out, offset = {}, 0
    with open(path, "wb") as f:
        for name, a in arrays.items():
            f.write(a.tobytes())
            out[name] = ExternalData(str(path), offset, a.nbytes, DType.of(a), a.shape)
            offset += a.nbytes
    return out


def _two_four(w: np.ndarray) -> np.ndarray:
    """w with the two smallest of every 4 consecutive entries of a row zeroed."""
    g = w.reshape(w.shape[0], -1, 4)
    np.put_along_axis(g, np.argsort(np.abs(g), axis=-1)[..., :2], 0, axis=-1)
    return w


def _d(fn: str, *sources, **attrs) -> Derived:
    return Derived(fn, sources, Attrs(attrs))


def _trees(s: dict[str, ExternalData]) -> dict[str, Derived]:
    t = {"w_t": _d("transpose", s["w"], perm=(1, 0)),
         "h_t": _d("transpose", s["h"], perm=None),
         "slice": _d("slice", _d("reshape", s["w"], shape=(2, 24, 70)), axis=1, start=3, stop=20),
         "concat": _d("concat", s["w"], s["v"], axis=0),
         "cast_h": _d("cast", s["w"], dtype="float16"),
         "cast_b": _d("cast", s["w"], dtype="bfloat16"),
         "cast_bf": _d("cast", s["b"], dtype="float32"),
         "cast_i": _d("cast", s["u8"], dtype="int32"),
         "scale": _d("scale", s["w"], factor=0.3),
         "scale_h": _d("scale", s["h"], factor=0.3),
         "scale_b": _d("scale", s["b"], factor=0.3),
         "add_b": _d("add_scalar", s["b"], value=1.7),
         "add_h": _d("add_scalar", s["h"], value=-0.5),
         "astype": _d("astype_float32", s["u8"]),
         "to_int8": _d("uint8_to_int8", s["u8"]),
         "nibbles": _d("nibble_zero_points", s["zp"], n=48, groups=3),
         "broadcast": _d("broadcast_to", s["one"], shape=(4, 3)),
         "blocked_b": _d("quant_blocked", _d("transpose", s["b"], perm=(1, 0)), block=16),
         "pruned_h": _d("prune_magnitude", s["h"], fraction=0.5, n=2, m=4),
         "pruned_w": _d("prune_magnitude", s["w"], fraction=0.3)}
    for bits, group, sym in [(4, 32, False), (4, 32, True), (8, 0, True), (8, 64, False)]:
        for part in ("qweight", "scales") + (() if sym else ("zero_points",)):
            q = _d("quantize", _d("concat", s["w"], s["v"], axis=0), bits=bits, group=group,
                   symmetric=sym, part=part)
            t[f"q{bits}g{group}{'s' if sym else ''}.{part}"] = q
            t[f"q{bits}g{group}{'s' if sym else ''}.{part}.blocked"] = _d("quant_blocked", q,
                                                                          block=16)
    t["q_bf16.scales"] = _d("quantize", s["b"], bits=4, group=32, symmetric=False,
                            part="scales")
    q8 = _d("quantize", s["w"], bits=8, group=0, symmetric=True, part="qweight")
    for part in ("values", "meta"):
        t[f"nm.{part}"] = _d("sparse_encode", s["sp24"], layout="nm", part=part)
        t[f"bitmap.{part}"] = _d("sparse_encode", s["sp24"], layout="bitmap", part=part,
                                 capacity=600)
        t[f"bitmap_bf16.{part}"] = _d("sparse_encode", s["b"], layout="bitmap", part=part,
                                      capacity=1040)
        t[f"bitmap_q8.{part}"] = _d("sparse_encode", q8, layout="bitmap", part=part,
                                    capacity=16 * 71)
    return t


def _fns(src) -> list[str]:
    return [src.fn, *(f for s in src.sources for f in _fns(s))] if isinstance(src, Derived) else []


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


def test_every_compiler_transform_but_the_calibrated_ones_has_a_numpy_twin():
    assert set(TRANSFORMS) == set(PARAM_TRANSFORMS) - {"gptq", *convert._CALIBRATED_PRUNING}


@pytest.mark.parametrize("stored", ["natural", "float16", "bfloat16"])
def test_derivations_match_the_compiler_bit_for_bit(leaves, stored):
    trees = _trees(leaves)
    assert {fn for d in trees.values() for fn in _fns(d)} == set(TRANSFORMS)
    for name, tree in trees.items():
        _assert_derives_as_the_compiler(name, tree, stored)


def test_quantizing_in_row_chunks_changes_nothing(leaves, monkeypatch):
    monkeypatch.setattr(convert, "QUANTIZE_ELEMENTS", 3 * 70)  # 3 rows at a time
    for name, tree in _trees(leaves).items():
        if "quantize" in _fns(tree):
            _assert_derives_as_the_compiler(name, tree, "natural")


def _assert_derives_as_the_compiler(name: str, tree: Derived, stored: str) -> None:
    ref = tree.load()
    dtype = str(ref.dtype) if stored == "natural" or ref.dtype.kind != "f" else stored
    want = _bits(_as_dtype(ref, dtype))
    got = derive(tree.describe(), _path(tree), dtype, name=name)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.dtype, want.dtype)
    assert got.tobytes() == want.tobytes(), name


def _path(src) -> str:
    return src.path if isinstance(src, ExternalData) else _path(src.sources[0])


def test_written_safetensors_read_back_with_both_readers(tmp_path):
    from safetensors.numpy import load_file

    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((3, 5), dtype=np.float32), "s": np.array(7, np.int64),
              "q": rng.integers(-8, 8, (9,), dtype=np.int8), "e": np.zeros((0, 2), np.float32),
              "h": rng.standard_normal(6).astype(np.float16),
              "b": rng.standard_normal((2, 2)).astype(DType.bf16.numpy)}
    path = tmp_path / "p.safetensors"
    write_safetensors(path, [(k, str(a.dtype), list(a.shape)) for k, a in arrays.items()],
                      lambda k: arrays[k])
    for back in (load_file(str(path)), read_safetensors(path)):
        assert sorted(back) == sorted(arrays)
        for k, a in arrays.items():
            assert back[k].shape == a.shape and _bits(back[k]).tobytes() == _bits(a).tobytes()


def test_gptq_and_embedded_data_are_refused(leaves):
    gptq = _d("gptq", leaves["w"], bits=4, group=32, symmetric=True, part="scales")
    with pytest.raises(KilnError, match=r"parameter p: GPTQ.*kiln convert"):
        derive(gptq.describe(), leaves["w"].path, "float32", name="p")
    inline = {"kind": "derived", "fn": "transpose", "attrs": {}, "sources": [{"kind": "inline"}]}
    with pytest.raises(KilnError, match="parameter p: its data is embedded in the ONNX file"):
        derive(inline, leaves["w"].path, "float32", name="p")
