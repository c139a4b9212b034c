"""Session details of the CUDA path, run with TVM's CPU runtime standing in for the device (no
GPU needed): decode_greedy feeds the previous step's greedy tokens back as the device tensor they
already are (no copy to the device; other tokens are copied and checked), with a stand-in for
the compiled decode entry that records what it was given; bfloat16 parameters load from their
bits where numpy alone is installed."""

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



def test_bfloat16_parameters_upload_from_their_bits_without_ml_dtypes(monkeypatch):
    """A numpy-only host reads bfloat16 parameters as uint16 bits; they are accepted for a
    bfloat16 parameter and uploaded as bfloat16 (bits unchanged), and refused for others."""
    from kiln.runtime import session as sess
    from kiln.runtime.params import bfloat16_bits

    monkeypatch.setattr(sess, "bfloat16_dtype", lambda: np.dtype(np.uint16))  # no ml_dtypes
    x = np.array([1.0, -2.5, 3.140625], np.float32)
    bits = bfloat16_bits(x)
    assert sess._is_dtype(bits, "bfloat16")
    assert not sess._is_dtype(bits, "float16") and not sess._is_dtype(x, "bfloat16")
    t = sess.upload(tvm, bits, "bfloat16", tvm.cpu(0))
    assert t.dtype == "bfloat16"
    assert np.frombuffer(t.numpy().tobytes(), np.uint16).tolist() == bits.tolist()
