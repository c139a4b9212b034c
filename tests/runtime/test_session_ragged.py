"""Session.prefill_batch's bookkeeping for prompts of unequal lengths (CUDA path), with TVM's CPU
runtime standing in for the device and stand-ins for the compiled entry points: each prompt is
prefilled alone and its cache copied into its row of the batch's cache (a view at the row's byte
offset), row lengths become past + offsets, decode passes the offsets after past; what cannot
run is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.session import Session

tvm = pytest.importorskip("tvm")

VOCAB, CAP, MAX_BATCH = 64, 16, 4


class FakeEntries:
    """prefill_last writes prompt token t at cache position j as (t, j) into every cache and
    returns logits whose argmax is the last token + 1; decode returns input + 1. Both record the
    `past` shape tuples they are given."""

    def __init__(self, dev):
        self.dev, self.shapes = dev, []

    def __getitem__(self, entry):
        return getattr(self, entry)

    def prefill_last(self, past, ids, caches, params):
        self.shapes.append(("prefill", list(past)))
        ids = ids.numpy()
        for c in caches:
            a = c.numpy()
            a[:, 0, :ids.shape[1], 0] = ids
            a[:, 0, :ids.shape[1], 1] = np.arange(ids.shape[1])
            c.copyfrom(a)
        return tvm.runtime.tensor(self._logits(ids[:, -1:]), self.dev)

    prefill = prefill_last

    def decode(self, past, ids, caches, params):
        self.shapes.append(("decode", list(past)))
        nxt = (ids.numpy() + 1) % VOCAB
        return [tvm.runtime.tensor(self._logits(nxt), self.dev), tvm.runtime.tensor(nxt,
                                                                                    self.dev)]

    @staticmethod
    def _logits(ids):
        out = np.zeros((ids.shape[0], 1, VOCAB), np.float32)
        out[np.arange(ids.shape[0]), 0, (ids[:, -1] + 1) % VOCAB] = 1
        return out


def _session(kind="cuda", row_offsets=MAX_BATCH) -> Session:
    target = {"kind": kind, "decode_greedy": True, "max_batch": MAX_BATCH}
    if row_offsets:
        target["row_offsets"] = row_offsets
    manifest = {"target": target, "architecture": {"vocab": VOCAB}, "files": {}, "params": [],
                "kv_cache": {"capacity": CAP}, "entry_points": ["prefill", "prefill_last",
                                                                "decode"],
                "signature": {"inputs": [{"name": "input_ids"}],
                              "caches": [{"name": f"past_{kv}", "kv_heads": 1, "head_dim": 2,
                                          "dtype": "float32"} for kv in "kv"]}}
    dev = tvm.cpu(0)
    art = af.Artifact(Path("fake"), manifest)
    assert art.max_seq == CAP
    return Session(art, FakeEntries(dev), dev, (), tvm)


PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10]]


def test_unequal_prompts_fill_their_rows_and_decode_at_their_lengths():
    s = _session()
    logits = s.prefill_batch(PROMPTS)
    assert logits.shape == (3, VOCAB)
    assert logits.argmax(-1).tolist() == [4, 6, 11]
    assert s.batch == 3 and s.past == 2 and s.offsets.tolist() == [1, 0, 3]
    assert s.row_lengths.tolist() == [3, 2, 5]
    for cache in s._caches:  # each row holds its own prompt, copied from the one-row cache
        a = cache.numpy()
        assert a.shape == (3, 1, CAP, 2)
        for r, p in enumerate(PROMPTS):
            assert a[r, 0, :len(p), 0].tolist() == p
            assert a[r, 0, :len(p), 1].tolist() == list(range(len(p)))
    # every prompt prefilled alone, offsets 0; decode takes the rows' offsets after past
    assert [sh for sh in s._vm.shapes] == [("prefill", [0, 0, 0, 0, 0])] * 3
    out = s.decode_greedy(logits.argmax(-1))
    assert out.tolist() == [5, 7, 12]
    assert s._vm.shapes[-1] == ("decode", [2, 1, 0, 3, 0])
    assert s.past == 3 and s.row_lengths.tolist() == [4, 3, 6]


def test_equal_prompts_run_as_one_batch():
    s = _session()
    logits = s.prefill_batch([[1, 2], [3, 4]])
    assert logits.argmax(-1).tolist() == [3, 5]
    assert s._vm.shapes == [("prefill", [0, 0, 0, 0, 0])]
    assert s.offsets.tolist() == [0, 0]
    s.decode_greedy([3, 5])
    assert s._vm.shapes[-1] == ("decode", [2, 0, 0, 0, 0])


def test_a_new_prefill_clears_the_offsets():
    s = _session()
    s.prefill_batch(PROMPTS)
    s.prefill([[1, 2], [3, 4]])
    assert s.offsets.tolist() == [0, 0]
    s.decode([1, 2])
    assert s._vm.shapes[-1] == ("decode", [2, 0, 0, 0, 0])


@pytest.mark.parametrize(("prompts", "match"), [
    ([[1]] * 3 + [[1, 2]] * 2, "batch 5 > 4"),
    ([[1], list(range(1, CAP + 2))], "exceeds the context of 16"),
    ([[1], []], "empty"),
    ([], "no prompts"),
])
def test_what_cannot_run_is_refused(prompts, match):
    with pytest.raises(KilnError, match=match):
        _session().prefill_batch(prompts)


def test_the_longest_row_bounds_the_context():
    s = _session()
    s.prefill_batch([[1] * (CAP - 1), [2]])
    s.decode_greedy([1, 1])  # the long row is now full
    with pytest.raises(KilnError, match="context exceeded: 16 cached"):
        s.decode_greedy([1, 1])


def test_unequal_rows_refuse_extend_and_rewind():
    s = _session()
    s.prefill_batch(PROMPTS)
    for call in (lambda: s.extend([[1], [2], [3]]), lambda: s.rewind(1)):
        with pytest.raises(KilnError, match="unequal lengths"):
            call()


def test_a_cpu_artifact_refuses_unequal_prompts():
    s = _session("llvm", row_offsets=0)
    with pytest.raises(KilnError, match="one length only \\(a CPU artifact"):
        s.prefill_batch(PROMPTS)
