"""Session.decode_greedy on a CUDA artifact feeds the previous step's greedy tokens back as the
device tensor they already are (no copy to the device); other tokens are copied and checked.
Run here with TVM's CPU runtime standing in for the device and a stand-in for the compiled
decode entry (it records what it was given), so no GPU is needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.compiler.errors import KilnError
from kiln.runtime import artifact as af
from kiln.runtime.session import Session

tvm = pytest.importorskip("tvm")

VOCAB = 32


class FakeDecode:
    """decode(past, input_ids, caches, params) -> (logits, ids): the next token is the
    input + 1 (mod VOCAB), computed by numpy; the input tensors given and the ids tensors
    returned are recorded."""

    def __init__(self, dev):
        self.dev, self.given, self.returned = dev, [], []

    def __getitem__(self, entry):
        assert entry == "decode"
        return self.decode

    def decode(self, past, ids, caches, params):
        self.given.append(ids)
        nxt = (ids.numpy() + 1) % VOCAB
        logits = np.zeros((nxt.shape[0], 1, VOCAB), np.float32)
        self.returned.append(tvm.runtime.tensor(nxt, self.dev))
        return [tvm.runtime.tensor(logits, self.dev), self.returned[-1]]


@pytest.fixture
def session():
    manifest = {"target": {"kind": "cuda", "decode_greedy": True, "max_batch": 4},
                "architecture": {"vocab": VOCAB}, "kv_cache": {"capacity": 64},
                "entry_points": ["prefill", "decode"],
                "signature": {"inputs": [{"name": "input_ids"}], "caches": []}}
    dev = tvm.cpu(0)
    s = Session(af.Artifact(Path("fake"), manifest), FakeDecode(dev), dev, (), tvm)
    s._caches, s.batch = ("cache",), 2  # as after a prefill of two rows
    return s


def test_greedy_tokens_are_fed_back_without_a_copy(session):
    vm = session._vm
    first = session.decode_greedy([3, 7])
    assert first.tolist() == [4, 8]
    second = session.decode_greedy(first)
    assert second.tolist() == [5, 9]
    assert vm.given[1] is vm.returned[0]  # the device tensor decode returned
    session.decode_greedy([1, 1])  # other tokens: copied to the device
    assert vm.given[2] is not vm.returned[1]
    assert vm.given[2].numpy().ravel().tolist() == [1, 1]
    assert session.past == 3


def test_tokens_not_from_the_last_step_are_still_checked(session):
    session.decode_greedy([3, 7])
    with pytest.raises(KilnError, match="out of range"):
        session.decode_greedy([3, VOCAB])


def test_a_reset_forgets_the_last_tokens(session):
    vm = session._vm
    out = session.decode_greedy([3, 7])
    session.reset()
    session._caches = ("cache",)
    session.decode_greedy(out)
    assert vm.given[1] is not vm.returned[0]

