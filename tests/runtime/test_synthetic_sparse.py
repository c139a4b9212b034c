"""Seeded weights for a 2:4 artifact compiled --no-weights (what the GPU host runs benchmarks
with): kiln.runtime.params.synthetic_params fills each `nm` (values, meta) pair the sparsify
pass made with a valid encoding of a magnitude-pruned matrix, reproducibly, in the artifact's
dtypes."""

from __future__ import annotations

import numpy as np


def _sparse_table(tmp_path) -> list[dict]:
    from kiln.compiler.compile import _in_dtype, compile_graph, param_table
    from kiln.models.synthetic import write_synthetic
    from kiln.passes.prune_weights import parse_config

    model = write_synthetic("llama-tiny", tmp_path / "m", weights=False)
    g = compile_graph(model, max_seq=64, progress=lambda m: None, weights_optional=True,
                      prune=parse_config("2:4", "magnitude"), sparse_target="cuda")
    table = _in_dtype(param_table(g, list(g.params)), "float16")
    return [p for p in table if p["file"] == "params.safetensors"]


def test_two_four_pairs_are_synthesized_as_valid_encodings(tmp_path):
    from kiln.runtime.params import sparse_part, synthetic_params
    from kiln.runtime.sparse_format import nm_decode, nm_encode

    table = _sparse_table(tmp_path)
    values = [p for p in table if sparse_part(p) == "values"]
    assert len(values) == 8  # q/k/v, o, gate/up and down of the two layers
    a, b = synthetic_params(table, 5), synthetic_params(table, 5)
    other = synthetic_params(table, 6)
    for p in values:
        base = p["name"].rsplit(".", 2)[0]
        v, meta = a[p["name"]], a[base + ".nm.meta"]
        assert v.dtype == np.float16 and meta.dtype == np.uint8
        assert list(v.shape) == p["shape"] and list(meta.shape) == [p["shape"][0],
                                                                     p["shape"][1] // 4]
        k = 2 * v.shape[1]
        w = nm_decode(v, meta, k)
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert groups.max() == 2 and (w != 0).mean() > 0.49  # 2 of every 4 kept
        # the stored pair is the layout's own encoding of that matrix
        v2, meta2 = nm_encode(w)
        np.testing.assert_array_equal(v2, v)
        np.testing.assert_array_equal(meta2, meta)
        np.testing.assert_array_equal(b[p["name"]], v)  # reproducible from the seed
        assert not np.array_equal(other[p["name"]], v)
