"""A CUDA artifact run by the Session on a GPU (skipped where there is none): prefill then decode
through the in-place KV cache and the captured decode graph agrees with one longer prefill.
The comparison against torch with the same weights is benchmarks/gpu/cuda_llm.py `check`."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.conftest import has_gpu

pytest.importorskip("tvm")
pytestmark = [pytest.mark.gpu, pytest.mark.tvm, pytest.mark.skipif(
    not (has_gpu() and shutil.which("nvcc")), reason="needs an NVIDIA GPU and nvcc")]


@pytest.mark.parametrize("dtype, tol, quant", [
    ("float32", 1e-4, None), ("float16", 2e-2, None),
    # the int8 KV cache: decode reads the rows and scales prefill quantized (a row's code may
    # round the other way where its K/V value from the GEMV differs from the GEMM's)
    ("float32", 1e-3, "kv8"), ("float16", 2e-2, "kv8")])
def test_prefill_then_decode_matches_one_prefill(tmp_path, dtype, tol, quant):
    from kiln.compiler.compile import compile_model
    from kiln.models.synthetic import write_synthetic
    from kiln.runtime.session import Session

    model = write_synthetic("llama-tiny", tmp_path / "m", weights=False)
    art = compile_model(model, tmp_path / "a", target="cuda", max_seq=64, weights=False,
                        dtype=dtype, quant=quant)
    s = Session.load(art, synthetic_weights=3)
    ids = np.random.default_rng(0).integers(0, s.vocab, 12)
    full = s.prefill(ids[None])[0]
    s.prefill(ids[None, :8])
    steps = [s.decode([t])[0, -1] for t in ids[8:]]
    for i, step in enumerate(steps):
        ref = full[8 + i]
        assert np.linalg.norm(step - ref) / np.linalg.norm(ref) < tol
    assert s.prefill(ids[None], last_only=True).shape == (1, 1, s.vocab)
