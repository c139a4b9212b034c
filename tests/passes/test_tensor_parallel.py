"""Tensor parallelism, CPU side (issue 17): the sharded graphs, run shard by shard by the
interpreter with its collectives, compute what the unsharded graph computes: logits, the
KV caches (each shard holding its heads) and greedy tokens, in prefill and decode, on three
families of seeded synthetic models (Llama: GQA, fused q/k/v and gate/up; Qwen2: attention
biases; GPT-2: biases everywhere, LayerNorm, a plain GELU MLP, an opset-12 Split)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kiln.compiler.compile import compile_graph
from kiln.compiler.errors import KilnError
from kiln.compiler.interpreter import run
from kiln.compiler.interpreter.collectives import run_shards
from kiln.models.synthetic import write_synthetic
from kiln.passes.gptq import _feeds
from kiln.passes.shard_tensor_parallel import shard, shard_feeds

TOL = 1e-5  # float32: the all-reduce sums the partial products in another order


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny", "gpt2-tiny"])
def graph(request, tmp_path_factory):
    src = write_synthetic(request.param, tmp_path_factory.mktemp(request.param), weights=True)
    return compile_graph(src, max_seq=64, progress=lambda m: None, weights_optional=False)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


def _gathered(results: list[dict], name: str, caches: set[str]) -> np.ndarray:
    """A sharded output as the unsharded graph has it: caches concatenated along the heads."""
    if name in caches:
        return np.concatenate([r[name] for r in results], axis=1)
    for r in results[1:]:  # (replicated after the all-gather: every shard holds the same)
        np.testing.assert_array_equal(r[name], results[0][name])
    return results[0][name]


def test_sharded_prefill_and_decode_equal_the_unsharded_graph(graph):
    shards = shard(graph, 2)
    caches = set(shards[0].meta["tensor_parallel"]["caches"])
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))  # two rows, seeded
    feeds = _feeds(graph, ids)
    want, got = run(graph, feeds), run_shards(shards, shard_feeds(shards, feeds))
    for name in graph.outputs:
        assert _rel(want[name], _gathered(got, name, caches)) < TOL, name
    # greedy decode, 8 steps, each side feeding back its own caches and tokens
    tokens = {"one": [], "tp": []}
    state = {"one": want, "tp": got}
    for step in range(8):
        pos = ids.shape[1] + step
        tok = {k: (v["logits"] if k == "one" else v[0]["logits"])[:, -1].argmax(-1)
               for k, v in state.items()}
        for k in tok:
            tokens[k].append(tok[k])
        common = {"input_ids": tok["one"][:, None],
                  "position_ids": np.full((2, 1), pos, np.int64),
                  "attention_mask": np.ones((2, pos + 1), np.int64)}
        past = {n.replace("present", "past_key_values"): n for n in graph.outputs
                if n.startswith("present")}
        common = {k: v for k, v in common.items() if k in graph.inputs}
        one = {**common, **{p: state["one"][o] for p, o in past.items()}}
        tp = [{**common, "input_ids": tok["tp"][:, None], **{p: r[o] for p, o in past.items()}}
              for r in state["tp"]]
        state = {"one": run(graph, one), "tp": run_shards(shards, tp)}
        assert _rel(state["one"]["logits"], state["tp"][0]["logits"]) < TOL, step
    np.testing.assert_array_equal(np.stack(tokens["one"]), np.stack(tokens["tp"]))


def test_each_shard_holds_an_nth_of_the_layer_weights_and_meets_at_collectives(graph):
    """Per layer two all-reduces (after the output and down projections), one all-gather of
    the logits; attention on half the heads; every split weight half its rows or columns."""
    layers = sum(n.op == "attention" for n in graph.nodes)
    for rank, g in enumerate(shard(graph, 2)):
        ops = Counter(n.op for n in g.nodes)
        assert ops["all_reduce"] == 2 * layers and ops["all_gather"] == 1
        assert g.meta["tensor_parallel"] == {**g.meta["tensor_parallel"], "shards": 2,
                                             "rank": rank}
        for a, b in zip((n for n in graph.nodes if n.op == "attention"),
                        (n for n in g.nodes if n.op == "attention"), strict=True):
            assert b.attrs["num_heads"] * 2 == a.attrs["num_heads"]
            assert b.attrs["num_kv_heads"] * 2 == a.attrs["num_kv_heads"]
        split = [p for name, p in g.params.items() if name.endswith(f":tp{rank}of2")]
        assert split
        for p in split:
            full = graph.params[p.name.removesuffix(f":tp{rank}of2")].type.shape
            assert 2 * int(np.prod(p.type.shape)) == int(np.prod(full)), p.name
    full = graph.param_bytes()
    assert sum(g.param_bytes() for g in shard(graph, 2)) < 2 * full  # not replicated whole


def test_heads_that_do_not_split_are_refused_in_one_line(graph):
    kvh = next(int(n.attrs["num_kv_heads"]) for n in graph.nodes if n.op == "attention")
    with pytest.raises(KilnError, match=r"node .* \(attention\): \d+ (KV|query) heads do not "
                                        r"split \d+ ways") as e:
        shard(graph, 2 * kvh if kvh < 4 else 3)
    assert "\n" not in str(e.value)


def test_a_collective_outside_a_sharded_run_is_an_error(graph):
    shards = shard(graph, 2)
    ids = np.random.default_rng(1).integers(0, 256, (1, 4))
    with pytest.raises(KilnError, match="collective of 2 shards outside run_shards"):
        run(shards[0], shard_feeds(shards, _feeds(graph, ids))[0])
    assert shard(graph, 1) == (graph,)
