"""An ONNX decoder run by onnxruntime as a language model: all-position logits of a token window
from an empty past (the reference side of `kiln eval`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.compiler.errors import KilnError
from kiln.compiler.frontend.onnxruntime_ref import _session


class OrtLM:
    """`OrtLM(path)(ids)` -> logits (1, seq, vocab), like `Session.prefill`."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise KilnError(f"{self.path}: no such ONNX file")
        self.sess = _session(self.path, threads, optimize=True)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        if "input_ids" not in self.inputs:
            raise KilnError(f"{self.path}: has no input_ids input (not a decoder export?)")
        outputs = [o.name for o in self.sess.get_outputs()]
        if "logits" not in outputs:
            raise KilnError(f"{self.path}: has no logits output (not a decoder export?)")
        logits = next(o for o in self.sess.get_outputs() if o.name == "logits")
        self.vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.atleast_2d(np.asarray(ids, np.int64))
        b, s = ids.shape
        feeds = {"input_ids": ids, "attention_mask": np.ones((b, s), np.int64),
                 "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy()}
        for name, info in self.inputs.items():
            if name.startswith("past"):
                _, heads, _, head_dim = info.shape
                feeds[name] = np.zeros((b, heads, 0, head_dim), np.float32)
        missing = sorted(set(self.inputs) - set(feeds))
        if missing:
            raise KilnError(f"{self.path}: cannot feed inputs {missing}")
        try:
            return self.sess.run(["logits"], {k: v for k, v in feeds.items()
                                              if k in self.inputs})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise KilnError(f"{self.path}: onnxruntime failed: {first}") from e
